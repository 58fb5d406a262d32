"""Brute-force ground truth for detection: which tensors leave every output unchanged when doubled.

The oracle works on a float64 deep copy of the model in train mode, at a *generic point*:
tensors that are constant-filled at init (zero biases, BatchNorm γ=1/β=0, ``zero_init_last``,
layer scale 1e-6) get random values first, because those init values make tensors look
invariant, or not, by accident. Every normalization's ``eps`` (any module attribute named
``eps``) is set to ~0 so that invariance is exact; every forward pass runs under the same RNG
seed (dropout, stochastic depth, detection samplers).

For each trainable tensor ``w`` the outputs are compared for ``w`` as is, ``2·w`` and ``w`` plus a
random perturbation of 30 % of its norm:

* *dead*: the perturbation changes nothing (a conv bias before BatchNorm, the β of a norm
  whose output reaches another per-channel normalization only through a linear map);
* *invariant*: doubling changes nothing (relative change under ``TOL``);
* *eps-dominated*: invariant with eps ≈ 0 but, with the model's real ``eps`` (weights as built,
  constant-filled tensors at generic values), its exact radial cosine exceeds ``EPS_COS``, a
  tenth of the detection threshold: the normalization's input variance is within a few
  thousand ``eps``, so eps decides whether the tensor passes the numerical confirmation. Not
  finding it is no miss; finding it is no false positive.

Tensors whose relative change falls in ``[TOL, AMBIGUOUS)`` are listed in
:attr:`OracleResult.ambiguous` (too close to call; scored as not invariant).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

TOL = 1e-10  # relative output change under which doubling "changes nothing" (float64)
ORACLE_EPS = 1e-30


@dataclass
class OracleResult:
    invariant: set[str] = field(default_factory=set)
    dead: set[str] = field(default_factory=set)
    other: set[str] = field(default_factory=set)
    eps_dominated: set[str] = field(default_factory=set)
    change: dict[str, float] = field(default_factory=dict)  # relative output change under 2·w
    ambiguous: dict[str, float] = field(default_factory=dict)


def _outputs(value: Any) -> list[Tensor]:
    leaves = [t for t in tree_flatten(value)[0] if isinstance(t, Tensor) and t.is_floating_point()]
    if not leaves:
        raise ValueError("the forward returned no floating-point tensor")
    return [t.detach().reshape(-1) for t in leaves]


def _relative_change(a: list[Tensor], b: list[Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        scale = float(y.norm())
        diff = float((x - y).norm())
        if not (diff == diff):  # NaN
            return float("inf")
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


def generic_point(model: nn.Module, seed: int = 0) -> None:
    """Give constant-filled tensors (zeros, ones, layer scale) random values, in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            if flat.numel() == 0 or not bool((flat == flat[0]).all()):
                continue
            c = float(flat[0])
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p)
            if abs(c) > 1e-3:
                p.copy_(c * (1.0 + 0.3 * noise))
            else:  # zeros and tiny constants (layer scale 1e-6): O(1) random values
                p.copy_(0.3 * noise)


def _set_eps(model: nn.Module, value: float | None) -> dict[nn.Module, float]:
    saved = {}
    for m in model.modules():
        eps = getattr(m, "eps", None)
        if isinstance(eps, float) and not isinstance(m, torch.optim.Optimizer):
            saved[m] = eps
            if value is not None:
                m.eps = value
    return saved


class _Runner:
    def __init__(self, model: nn.Module, forward: Callable[[nn.Module], Any], seed: int) -> None:
        self.model, self.forward, self.seed = model, forward, seed
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def __call__(self) -> list[Tensor]:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(self.seed)
            out = _outputs(self.forward(self.model))
            for b, saved in self.buffers:
                b.copy_(saved)
        return out

    def change(self, tensors: list[Tensor], edit: Callable[[], None], base: list[Tensor]) -> float:
        """The outputs' relative change from ``base`` while ``edit()`` (run under ``no_grad``) has
        changed ``tensors`` in place; they are restored afterwards."""
        saved = [t.detach().clone() for t in tensors]
        with torch.no_grad():
            edit()
        try:
            return _relative_change(self(), base)
        finally:
            with torch.no_grad():
                for t, old in zip(tensors, saved):
                    t.copy_(old)


def _projection(outputs: list[Tensor], seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    total = outputs[0].new_zeros(())
    for t in outputs:
        total = total + (t * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t)).sum()
    return total


def _radial(model: nn.Module, forward: Callable[[nn.Module], Any], names: list[str], seed: int):
    """Exact-arithmetic radial cosine and gradient size of each tensor, from one backward of a
    random projection of all outputs."""
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = [t.reshape(-1) for t in tree_flatten(forward(model))[0] if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad]
        _projection(out, seed).backward()
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    cos, size = {}, {}
    for n in names:
        w, g = params[n].detach(), params[n].grad
        if g is None:
            cos[n], size[n] = float("nan"), 0.0
            continue
        wn, gn = float(w.norm()), float(g.norm())
        size[n] = wn * gn if wn > 0 else gn
        cos[n] = abs(float((w * g).sum())) / (wn * gn) if wn > 0 and gn > 0 else float("nan")
    model.zero_grad(set_to_none=True)
    return cos, size


def _scaling_test(run, params, names, base, generator, result) -> set[str]:
    """Names whose scaling leaves the outputs unchanged. A single tensor is doubled; a group is
    scaled by independent random factors in [1.5, 2.5] at once (unchanged outputs then mean each
    is invariant, except on a measure-zero set of factors) and split in halves otherwise."""
    if len(names) == 1:
        name = names[0]
        p = params[name]
        rel = run.change([p], lambda: p.mul_(2.0), base)
        result.change[name] = rel
        if TOL <= rel < AMBIGUOUS:
            result.ambiguous[name] = rel
        return {name} if rel < TOL else set()
    factors = 1.5 + torch.rand(len(names), generator=generator, dtype=torch.float64)

    def scale() -> None:
        for n, f in zip(names, factors.tolist()):
            params[n].mul_(f)

    rel = run.change([params[n] for n in names], scale, base)
    if rel < TOL:
        result.change.update(dict.fromkeys(names, rel))
        return set(names)
    half = len(names) // 2
    return _scaling_test(run, params, names[:half], base, generator, result) | _scaling_test(
        run, params, names[half:], base, generator, result
    )


def _dead_test(run, params, names, noises, base) -> set[str]:
    """Names whose perturbation (``noises``) leaves the outputs unchanged: all perturbed at once
    (unchanged outputs then mean each is dead, except on a measure-zero set of perturbations),
    split in halves otherwise."""
    if not names:
        return set()

    def perturb() -> None:
        for n in names:
            params[n].add_(noises[n])

    rel = run.change([params[n] for n in names], perturb, base)
    if rel < TOL:
        return set(names)
    if len(names) == 1:
        return set()
    half = len(names) // 2
    return _dead_test(run, params, names[:half], noises, base) | _dead_test(run, params, names[half:], noises, base)


AMBIGUOUS = 1e-7  # relative changes in [TOL, AMBIGUOUS) are reported as too close to call
SCREEN = 1e-6  # exact radial cosine over which a tensor is proven non-invariant (d/dc L(c·w) ≠ 0)


def oracle(
    model: nn.Module,
    forward: Callable[[nn.Module], Any],
    names: Iterable[str] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> OracleResult:
    """Classify every trainable tensor of ``model`` (or only ``names``); ``model`` is untouched.

    ``forward(m)`` runs one forward pass of ``m`` and returns its outputs (any pytree); it must
    build its inputs in ``m``'s dtype (``next(m.parameters()).dtype``).

    Cost: one backward of a random projection of the outputs proves most tensors non-invariant
    (an invariant ``w`` has ``d/dc L(c·w) = ⟨∇L, w⟩ = 0``; a radial cosine over ``SCREEN`` in
    float64 cannot be rounding) and non-dead (a gradient); every other tensor gets the brute-force
    check: forwards with ``w`` perturbed (dead?) or doubled (invariant?), many tensors at once
    (group testing: one forward for a group that changes nothing, halves when it changes).
    """
    result = OracleResult()
    params = dict(model.named_parameters())
    wanted = [n for n in params if params[n].requires_grad and (names is None or n in set(names))]

    generic = copy.deepcopy(model).to(dtype).train()
    generic_point(generic, seed)
    _set_eps(generic, ORACLE_EPS)
    gen_params = dict(generic.named_parameters())
    cos, size = _radial(generic, forward, wanted, seed)
    largest = max(size.values(), default=0.0)
    run = _Runner(generic, forward, seed)
    base = run()
    generator = torch.Generator().manual_seed(seed + 1)
    # (nearly) no gradient: dead, or merely small? Perturbed together, split on a change.
    noises = {}
    for name in wanted:
        if size[name] <= 1e-9 * largest:
            p = gen_params[name]
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p)
            scale = 0.3 * float(p.detach().norm()) / max(float(noise.norm()), 1e-30)
            noises[name] = noise * (scale if scale > 0 else 0.3)
    result.dead = _dead_test(run, gen_params, list(noises), noises, base)
    candidates, suspects = [], []
    for name in wanted:
        if name in result.dead:
            continue
        if cos[name] == cos[name] and cos[name] > SCREEN:
            if size[name] > 1e-6 * largest:
                result.other.add(name)
            else:  # a clear radial cosine on a tiny gradient: most likely not invariant, doubled alone
                suspects.append(name)
        else:
            candidates.append(name)
    invariant = set()
    for name in suspects:  # alone: one forward each instead of splitting the group around each
        invariant |= _scaling_test(run, gen_params, [name], base, generator, result)
    if candidates:
        invariant |= _scaling_test(run, gen_params, candidates, base, generator, result)
    result.invariant = invariant
    result.other |= (set(candidates) | set(suspects)) - invariant

    # Eps-dominated: with the real eps (weights as built, constant-filled tensors generic), the
    # invariant's exact radial cosine is large: its normalization's input variance is near eps.
    if result.invariant:
        real = copy.deepcopy(model).to(dtype).train()
        generic_point(real, seed)  # zero-init gains would hide every gradient
        real_cos, _ = _radial(real, forward, sorted(result.invariant), seed)
        result.eps_dominated = {n for n, c in real_cos.items() if c == c and c > EPS_COS}
    return result


EPS_COS = 1e-5  # a tenth of the detection threshold (1e-4): eps decides the confirmation


@dataclass
class Score:
    model: str
    tensors: int
    invariant: int
    found: int
    true_pos: int
    false_pos: list[str]
    missed: list[str]
    eps_dominated: int
    dead: int
    found_eps_dominated: int = 0
    seconds: float = 0.0

    @property
    def precision(self) -> float:
        return self.true_pos / self.found if self.found else 1.0

    @property
    def recall(self) -> float:
        return self.true_pos / self.invariant if self.invariant else 1.0

    @property
    def recall_all(self) -> float:
        """Recall over every invariant, the eps-dominated ones included."""
        total = self.invariant + self.eps_dominated
        return (self.true_pos + self.found_eps_dominated) / total if total else 1.0


def score(model_name: str, truth: OracleResult, found: Iterable[str], total: int) -> Score:
    """Compare detected names with the oracle: dead tensors are not scored; missing an
    eps-dominated invariant is no miss (finding it is no false positive either)."""
    found = set(found) - truth.dead
    counted = truth.invariant - truth.eps_dominated
    tp = found & truth.invariant
    fp = sorted(found - truth.invariant)
    missed = sorted(counted - found)
    return Score(
        model_name, total, len(counted), len(found - truth.eps_dominated),
        len(tp - truth.eps_dominated), fp, missed, len(truth.eps_dominated), len(truth.dead),
        len(found & truth.eps_dominated),
    )


def format_table(scores: list[Score]) -> str:
    """The per-model table the zoo test prints, with an overall line.

    Columns: trainable tensors; invariant tensors (eps-dominated excluded); found by detection;
    precision; recall; dead tensors (not scored); eps-dominated invariants; recall over all
    invariants, eps-dominated included; seconds (oracle + detection)."""
    header = (f"{'model':34s} {'tensors':>7s} {'inv':>5s} {'found':>5s} {'prec':>6s} {'recall':>6s} {'dead':>5s}"
              f" {'epsdom':>6s} {'rec+eps':>7s} {'s':>5s}")
    lines = [header, "-" * len(header)]
    for s in scores:
        lines.append(
            f"{s.model:34s} {s.tensors:7d} {s.invariant:5d} {s.found:5d} {s.precision:6.3f} {s.recall:6.3f}"
            f" {s.dead:5d} {s.eps_dominated:6d} {s.recall_all:7.3f} {s.seconds:5.1f}"
        )
        for name in s.false_pos:
            lines.append(f"    false positive: {name}")
        for name in s.missed:
            lines.append(f"    missed: {name}")
    tp = sum(s.true_pos for s in scores)
    found = sum(s.found for s in scores)
    inv = sum(s.invariant for s in scores)
    eps = sum(s.eps_dominated for s in scores)
    found_eps = sum(s.found_eps_dominated for s in scores)
    lines.append("-" * len(header))
    lines.append(
        f"{'overall (' + str(len(scores)) + ' models)':34s} {sum(s.tensors for s in scores):7d} {inv:5d} {found:5d}"
        f" {tp / found if found else 1.0:6.3f} {tp / inv if inv else 1.0:6.3f}"
        f" {sum(s.dead for s in scores):5d} {eps:6d}"
        f" {(tp + found_eps) / (inv + eps) if inv + eps else 1.0:7.3f} {sum(s.seconds for s in scores):5.1f}"
    )
    return "\n".join(lines)


_TRUTHS: dict[str, tuple[OracleResult, float]] = {}


def zoo_truth(entry: Any) -> tuple[OracleResult, float]:
    """The oracle's verdict on a zoo entry (``entry.build()`` under seed 0) and the seconds it
    took, computed once per test session: the whole-zoo, heldout and in-fit tests read the same
    verdict. The model is not kept: callers build their own (same seed, same weights)."""
    if entry.name not in _TRUTHS:
        start = time.perf_counter()
        torch.manual_seed(0)
        truth = oracle(entry.build(), entry.forward)
        _TRUTHS[entry.name] = (truth, time.perf_counter() - start)
    return _TRUTHS[entry.name]
