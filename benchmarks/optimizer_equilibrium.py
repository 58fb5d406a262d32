"""Measured Δ_t against the theory's Δ* for the optimizer families of ``docs/optimizer_theory.md``.

Plain torch loops (no Lightning), each at fixed (η, λ) for long enough to settle (≥ 6 relaxation
times), then Δ_t averaged over the second half:

* ``nrq``: a scale-invariant matrix/vector model with pure noise gradients (``P·ε/‖W‖``, P the
  projection orthogonal to W): the theory is exact up to its stated approximations;
* ``mlp``: a LayerNorm MLP on sklearn's digits, Muon on its bias-free hidden matrices (each feeds a
  LayerNorm: scale-invariant), AdamW on the rest;
* ``qknorm``: the QK-norm transformer (``examples.modules.qknorm_transformer``) on the Markov-chain
  tokens, Muon on every 2-D block weight, AdamW on embeddings/head/norms; q/k projections are the
  scale-invariant ones.

Real networks: Muon lr 0.02, λ 0.2, μ 0.95 (τ = 1/(2ηλ) = 125 steps), 1500 steps, Δ_t averaged over
the last 750.

``--noise``: the mlp with 30 % fixed random labels and input noise 0.5 (stationary gradient noise, as the
tests); ``--diagnose``: also the measured update correlation ρ against the theory's.

Usage: ``python benchmarks/optimizer_equilibrium.py [nrq] [mlp] [qknorm] [--heavy-ball] [--steps=N] [--noise]
[--diagnose]`` (prints a
Markdown table; a few minutes per part on 2 CPU cores).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from lightning_smd import theory


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() / a.double().norm(), b.double() / b.double().norm()
    return 2.0 * math.atan2((a - b).norm().item(), (a + b).norm().item())


def nrq(make_opt, star: float, shape=(64, 64), steps: int = 3000, seed: int = 0) -> float:
    """Mean Δ_t/Δ* over the second half of ``steps`` on the pure-noise scale-invariant model."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(*shape, generator=gen)
    w = nn.Parameter(w0 / w0.norm())
    opt = make_opt([w])
    ratios = []
    for t in range(steps):
        with torch.no_grad():
            n = w.norm()
            unit = w / n
            e = torch.randn(*shape, generator=gen)
            e -= (e * unit).sum() * unit
            w.grad = e / n
            before = w.detach().clone()
        opt.step()
        if t >= steps // 2:
            ratios.append(angle(before, w.detach()) / star)
    return sum(ratios) / len(ratios)


def run_nrq() -> list[tuple[str, float]]:
    rows = []
    lr, wd = 0.02, 0.1
    for nesterov in (False, True):
        for mom in ((0.0,) if nesterov else ()) + (0.9, 0.95):
            for shape in ((64, 64), (64, 256)):
                star = theory.angular_update_muon(lr, wd, mom, nesterov, shape)
                r = nrq(lambda p: torch.optim.Muon(p, lr=lr, weight_decay=wd, momentum=mom, nesterov=nesterov), star,
                        shape, steps=2000)
                rows.append((f"Muon μ={mom} nesterov={nesterov} {shape[0]}×{shape[1]}", r))
    for mom in (0.5, 0.9):
        star = theory.angular_update_nesterov(0.01, 0.01, mom)
        r = nrq(lambda p: torch.optim.SGD(p, lr=0.01, weight_decay=0.01, momentum=mom, nesterov=True), star,
                (4096,), steps=8000)
        rows.append((f"SGD Nesterov μ={mom}", r))
    return rows


def _digits_mlp(seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128, bias=False), nn.LayerNorm(128), nn.ReLU(),
                          nn.Linear(128, 128, bias=False), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, 10))
    return model, [model[1].weight, model[4].weight]


def real_network(kind: str, steps: int, lr: float = 0.02, wd: float = 0.2, momentum: float = 0.95,
                 nesterov: bool = True, seed: int = 0, noise: bool = False,
                 diagnose: bool = False) -> list[tuple[str, float]]:
    """Muon on the 2-D hidden weights; mean Δ_t/Δ* of the scale-invariant ones over the last half.

    ``noise`` (mlp): 30 % fixed random labels and input noise 0.5, the stationary-noise setting of the
    tests. ``diagnose``: also the update correlation the theory assumes, ρ = 1/(1 + 2S) with S the
    decay-weighted sum Σ_k (1 − ηλ)^(k−1)·c_k of the updates' autocorrelation c_k over the last half,
    against the theory's ρ (Δ*² = 2ηλρ)."""
    if kind == "mlp":
        from examples.data.digits import load_digits_tensors, with_label_noise

        x, y = load_digits_tensors()
        if noise:
            y = with_label_noise(y, 0.3, seed=0)
        model, invariant = _digits_mlp(seed)
        hidden = invariant
        loss_fn = nn.CrossEntropyLoss()

        def batch(gen):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            xb = x[idx] + 0.5 * torch.randn(x[idx].shape, generator=gen) if noise else x[idx]
            return loss_fn(model(xb), y[idx])
    else:
        from examples.data.markov import markov_chain, sample_sequences
        from examples.modules.qknorm_transformer import TransformerLM

        torch.manual_seed(seed)
        model = TransformerLM(vocab_size=64, seq_len=32, dim=64, depth=2, heads=4)
        tokens = sample_sequences(markov_chain(64, 4, seed), 4096, 33, seed)
        hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")]
        invariant = [p for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "k_proj.weight"))]

        def batch(gen):
            idx = torch.randint(0, len(tokens), (32,), generator=gen)
            seq = tokens[idx]
            logits = model(seq[:, :-1])
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=wd, momentum=momentum, nesterov=nesterov)
    adamw = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    sums = [0.0] * len(invariant)
    count = 0
    updates: list[list[torch.Tensor]] = [[] for _ in invariant]
    for t in range(steps):
        loss = batch(gen)
        muon.zero_grad()
        adamw.zero_grad()
        loss.backward()
        before = [p.detach().clone() for p in invariant]
        muon.step()
        adamw.step()
        if t >= steps // 2:
            count += 1
            for i, (b, p) in enumerate(zip(before, invariant)):
                sums[i] += angle(b, p.detach())
                if diagnose:
                    updates[i].append((p.detach() - (1 - lr * wd) * b).double())
    names = {id(p): n for n, p in model.named_parameters()}
    rows = []
    for i, (p, s) in enumerate(zip(invariant, sums)):
        star = theory.angular_update_muon(lr, wd, momentum, nesterov, tuple(p.shape))
        label = f"{kind}{' noisy' if noise else ''} {names[id(p)]} {tuple(p.shape)} (μ={momentum}, nesterov={nesterov})"
        rows.append((label, s / count / star))
        if diagnose:
            u = torch.stack(updates[i])
            n, e0 = len(u) // 2, (u * u).sum(dim=(1, 2)).mean()
            corr = sum((1 - lr * wd) ** (k - 1) * ((u[n:] * u[n - k:len(u) - k]).sum() / (len(u) - n) / e0).item()
                       for k in range(1, n))
            rows.append((f"{label}: ρ measured / ρ theory",
                         (1 / (1 + 2 * corr)) / theory.muon_correlation(momentum, nesterov, tuple(p.shape))))
    return rows


def main(argv: list[str]) -> None:
    which = [a for a in argv if not a.startswith("--")] or ["nrq", "mlp", "qknorm"]
    both = "--heavy-ball" in argv  # also nesterov=False on the real networks (twice the time)
    steps = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--steps=")), 1500)
    rows = []
    if "nrq" in which:
        rows += run_nrq()
    for kind in ("mlp", "qknorm"):
        if kind in which:
            for nesterov in (True, False) if both else (True,):
                rows += real_network(kind, steps=steps, nesterov=nesterov, noise="--noise" in argv,
                                     diagnose="--diagnose" in argv)
    print("| setup | measured Δ_t / Δ* |\n|---|---|")
    for name, r in rows:
        print(f"| {name} | {r:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
