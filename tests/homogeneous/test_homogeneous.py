"""Homogeneous networks (issue 23): degree, margins, EWN/SWN, relative sparsity, pruning, callback."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as swn

from lightning_smd.homogeneous import (
    homogeneity_degree,
    layer_unit_norms,
    margins,
    normalized_margin,
    param_norm,
    pruning_curve,
    relative_sparsity,
    smoothed_margin,
    unit_norms,
)
from lightning_smd.parametrizations import exp_weight_norm


def mlp(depth: int, bias_at=(0,), act=nn.ReLU, width: int = 16, d_in: int = 6, d_out: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    layers, d = [], d_in
    for i in range(depth):
        out = d_out if i == depth - 1 else width
        layers.append(nn.Linear(d, out, bias=i in bias_at))
        d = out
        if i < depth - 1:
            layers.append(act())
    return nn.Sequential(*layers)


class SquaredReLU(nn.Module):
    def forward(self, x):
        return torch.relu(x) ** 2


X = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))


# -- degree -------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_relu_mlp_with_first_layer_bias_has_degree_depth(depth):
    result = homogeneity_degree(mlp(depth, bias_at=(0,)), X)
    assert result.homogeneous, result.message()
    assert result.degree == depth
    assert result.euler_degree == pytest.approx(depth, rel=1e-4)
    assert all(v == pytest.approx(depth, rel=1e-4) for v in result.scale_degrees.values())


def test_later_bias_makes_it_not_homogeneous_and_is_named():
    model = mlp(3, bias_at=(0, 2))  # Sequential: 0 Linear, 1 ReLU, 2 Linear, 3 ReLU, 4 Linear (biased)
    result = homogeneity_degree(model, X)
    assert not result.homogeneous and result.degree is None
    assert list(result.breakers) == ["4.bias"]
    assert "4.bias" in result.message()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # restored


def test_every_breaking_bias_is_named_even_zero_initialized():
    model = mlp(4, bias_at=(0, 1, 3))
    with torch.no_grad():
        model[2].bias.zero_()  # zero-init: invisible at this point, found at a generic point
    result = homogeneity_degree(model, X)
    assert set(result.breakers) == {"2.bias", "6.bias"}
    assert "2.bias" in result.generic
    assert float(model[2].bias.detach().abs().max()) == 0.0


def test_normalization_layer_and_additive_constant_are_named():
    bn = nn.Sequential(nn.Linear(6, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2, bias=False))
    bn.train()(X)  # running statistics away from (0, 1)
    result = homogeneity_degree(bn.eval(), X)
    assert not result.homogeneous and list(result.breakers) == ["1"]
    assert "BatchNorm1d" in result.breakers["1"] and "running_mean" in result.breakers["1"]

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8, bias=False), nn.Linear(8, 2, bias=False)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) + 1.0)

    result = homogeneity_degree(Shifted(), X)
    assert list(result.breakers) == ["<root>"] and "additive constant" in result.breakers["<root>"]


def squared_relu_degree(k: int) -> int:
    """k squared-ReLU hidden layers then a linear output: d_0 = 0, d_i = 2(d_{i-1} + 1), L = d_k + 1."""
    d = 0
    for _ in range(k):
        d = 2 * (d + 1)
    return d + 1


@pytest.mark.parametrize("k", [1, 2, 3])
def test_squared_relu_degree_matches_closed_form(k):
    assert squared_relu_degree(k) == 2 ** (k + 1) - 1  # the closed form of the recursion
    x = X.double()
    result = homogeneity_degree(mlp(k + 1, bias_at=(), act=SquaredReLU).double(), x, scales=(0.8, 1.25, 1.5))
    assert result.homogeneous, result.message()
    assert result.degree == 2 ** (k + 1) - 1
    if k >= 2:
        assert result.degree != 2 * (k + 1)  # not "2 × depth"


def test_euler_identity_per_example_and_output():
    model = mlp(3, bias_at=(0,)).double()
    x = X.double()
    out = model(x)
    handles_norm = param_norm(model)
    assert handles_norm > 0
    for i, j in [(0, 0), (5, 2), (31, 1)]:
        grads = torch.autograd.grad(out[i, j], list(model.parameters()), retain_graph=True)
        radial = sum(float((p.detach() * g).sum()) for p, g in zip(model.parameters(), grads))
        assert radial == pytest.approx(3 * float(out[i, j].detach()), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("norm", ["ewn", "swn"])
def test_weight_normalized_network_degree_and_param_norm(norm):
    model = mlp(3, bias_at=())
    ref_norm = math.sqrt(sum(float(m.weight.detach().norm()) ** 2 for m in model if isinstance(m, nn.Linear)))
    wrap = exp_weight_norm if norm == "ewn" else swn
    for m in model:
        if isinstance(m, nn.Linear):
            wrap(m)
    with torch.no_grad():  # v off the unit sphere: only w's scale may count
        for m in model:
            if isinstance(m, nn.Linear):
                m.parametrizations.weight.original1.mul_(3.0)
    result = homogeneity_degree(model, X)
    assert result.homogeneous and result.degree == 3, result.message()
    assert param_norm(model) == pytest.approx(ref_norm, rel=1e-5)


# -- margins ------------------------------------------------------------------------------------
def _brute_margins(logits, targets):
    out = []
    for row, y in zip(logits.tolist(), targets.tolist()):
        if len(row) == 1:
            out.append((1 if y == 1 else -1) * row[0])
        else:
            out.append(row[y] - max(v for j, v in enumerate(row) if j != y))
    return out


def test_margin_equals_brute_force_on_saved_logits(tmp_path):
    torch.manual_seed(0)
    model = mlp(3, bias_at=(), d_out=4)
    y = torch.randint(0, 4, (32,))
    torch.save({"logits": model(X).detach(), "targets": y}, tmp_path / "logits.pt")
    saved = torch.load(tmp_path / "logits.pt")
    logits, targets = saved["logits"] * 5, saved["targets"]
    logits[torch.arange(32), targets] += 15.0  # every example right: the smoothed margin is defined
    rho, L = 1.7, 3
    stats = normalized_margin(logits, targets, rho, L)
    q = _brute_margins(logits.double(), targets)
    assert margins(logits, targets).tolist() == pytest.approx(q)
    assert stats.normalized == pytest.approx(min(q) / rho**L, rel=1e-12)
    assert stats.support_count == sum(v < min(q) + math.log(10) for v in q)
    import numpy as np

    qs = np.array(q) / rho**L
    assert stats.percentiles[5] == pytest.approx(np.percentile(qs, 5))
    assert stats.percentiles[50] == pytest.approx(np.percentile(qs, 50))
    # Lyu & Li, cross-entropy: γ̃ = −log(e^𝓛 − 1)/ρ^L with 𝓛 the summed loss
    ce = float(F.cross_entropy(logits.double(), targets, reduction="sum"))
    assert stats.smoothed == pytest.approx(-math.log(math.expm1(ce)) / rho**L, rel=1e-9)
    exp_loss = sum(math.exp(-(r[t] - r[j])) for r, t in zip(logits.double().tolist(), targets.tolist())
                   for j in range(4) if j != t)
    assert smoothed_margin(logits, targets, rho, L, "exponential") == pytest.approx(math.log(1 / exp_loss) / rho**L)
    assert stats.smoothed <= stats.normalized


def test_binary_margin_and_undefined_smoothed_margin():
    logits = torch.tensor([[2.0], [-3.0], [0.1]])
    targets = torch.tensor([1, 0, 1])
    stats = normalized_margin(logits, targets, 2.0, 2)
    assert stats.normalized == pytest.approx(0.1 / 4)
    logistic = sum(math.log1p(math.exp(-q)) for q in (2.0, 3.0, 0.1))
    assert logistic > math.log(2)
    assert stats.smoothed is None  # 𝓛 ≥ ℓ(0): not defined, not made up
    assert normalized_margin(logits * 20, targets, 2.0, 2).smoothed == pytest.approx(
        -math.log(math.expm1(sum(math.log1p(math.exp(-20 * q)) for q in (2.0, 3.0, 0.1)))) / 4)
    # exponential loss, one logit: γ̃ = −log Σ_i e^{−q_i} / ρ^L with the SUMMED loss (Lyu & Li)
    q = (2.0, 3.0, 0.1)
    assert sum(math.exp(-v) for v in q) > 1 and smoothed_margin(logits, targets, 2.0, 2, "exponential") is None
    for c in (2.0, 400.0):  # at c = 400 every e^{−q_i} underflows float64: log-sum-exp keeps it exact
        expected = -(-c * 0.1 + math.log1p(math.exp(-c * 1.9) + math.exp(-c * 2.9))) / 2.0**3
        scaled = torch.tensor([[2.0], [-3.0], [0.1]], dtype=torch.float64) * c
        assert smoothed_margin(scaled, targets, 2.0, 3, "exponential") == pytest.approx(expected, rel=1e-12)
        assert smoothed_margin(scaled, targets, 2.0, 3, "exponential") <= normalized_margin(scaled, targets, 2.0, 3).normalized
    mean_based = math.log(3 / sum(math.exp(-2.0 * v) for v in q)) / 2.0**3  # what a MEAN loss would give
    assert smoothed_margin(logits * 2, targets, 2.0, 3, "exponential") != pytest.approx(mean_based)


def test_normalized_margin_does_not_decrease_in_the_late_phase():
    """Gradient descent, logistic loss, a bias-free 2-layer ReLU net on separable data (Lyu & Li):
    once the data are fitted the smoothed margin never decreases and γ̄ ends above where it was."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 32, bias=False), nn.ReLU(), nn.Linear(32, 1, bias=False)).double()
    x = x.double()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    smoothed, normalized = [], []
    for step in range(800):
        logits = net(x)
        loss = F.binary_cross_entropy_with_logits(logits.squeeze(1), y.double(), reduction="sum")
        if step % 40 == 0:
            stats = normalized_margin(logits.detach(), y, param_norm(net), 2)
            if stats.smoothed is not None:
                smoothed.append(stats.smoothed)
                normalized.append(stats.normalized)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert len(smoothed) >= 10, "the late phase was not reached"
    assert all(b >= a - 1e-12 for a, b in zip(smoothed, smoothed[1:]))
    assert normalized[-1] > normalized[0] > 0


# -- EWN / SWN ----------------------------------------------------------------------------------
def test_exp_weight_norm_leaves_w_unchanged_and_parametrizes_per_unit():
    layer = nn.Linear(5, 4)
    w = layer.weight.detach().clone()
    exp_weight_norm(layer)
    assert torch.allclose(layer.weight, w, atol=1e-7)
    s = layer.parametrizations.weight.original0
    assert s.shape == (4, 1)
    assert torch.allclose(torch.exp(s).squeeze(1), w.norm(dim=1))
    assert torch.allclose(unit_norms(layer), w.norm(dim=1).double(), rtol=1e-6)
    with pytest.raises(ValueError, match="no tensor 'scale'"):
        exp_weight_norm(nn.Linear(2, 2), name="scale")


def _flow(param_fn, params, grad_w):
    """ẇ = J(params)·(−∇_params 𝓛) for 𝓛 = ⟨grad_w, w⟩ (so ∇_w 𝓛 = grad_w)."""
    params = [p.detach().clone().requires_grad_(True) for p in params]
    w = param_fn(*params)
    grads = torch.autograd.grad((w * grad_w).sum(), params)
    _, w_dot = torch.autograd.functional.jvp(param_fn, tuple(p.detach() for p in params),
                                             tuple(-g for g in grads))
    return w.detach(), w_dot


@pytest.mark.parametrize("norm", ["ewn", "swn"])
def test_weight_norm_gradient_flow_matches_the_per_unit_learning_rate(norm):
    """EWN: ẇ_u = −‖w_u‖²·[P∥ + P⊥/‖v_u‖²]·g_u; SWN: ẇ_u = −[P∥ + (γ_u²/‖v_u‖²)·P⊥]·g_u
    (docs/homogeneous.md). With ‖v_u‖ = 1, EWN is plain gradient flow at learning rate ‖w_u‖²."""
    torch.manual_seed(0)
    layer = nn.Linear(7, 5, bias=False)
    (exp_weight_norm if norm == "ewn" else swn)(layer)
    chain = layer.parametrizations.weight
    with torch.no_grad():
        chain.original1.mul_(torch.rand(5, 1) * 3 + 0.5)  # ‖v_u‖ ≠ 1, different per unit
        chain.original0.copy_(torch.randn(5, 1))
    fn = lambda a, b: chain[0](a, b)  # noqa: E731
    g = torch.randn(5, 7, dtype=torch.float32)
    w, w_dot = _flow(fn, [chain.original0, chain.original1], g)
    v_norm = chain.original1.detach().norm(dim=1, keepdim=True)
    w_hat = w / w.norm(dim=1, keepdim=True)
    par = (g * w_hat).sum(1, keepdim=True) * w_hat
    perp = g - par
    if norm == "ewn":
        expected = -(w.norm(dim=1, keepdim=True) ** 2) * (par + perp / v_norm**2)
    else:
        gamma = chain.original0.detach()
        expected = -(par + gamma**2 / v_norm**2 * perp)
    assert torch.allclose(w_dot, expected, rtol=1e-4, atol=1e-5)
    if norm == "ewn":  # ‖v_u‖ = 1: exactly −‖w_u‖²·g_u
        with torch.no_grad():
            chain.original1.div_(v_norm)
        w, w_dot = _flow(fn, [chain.original0, chain.original1], g)
        assert torch.allclose(w_dot, -(w.norm(dim=1, keepdim=True) ** 2) * g, rtol=1e-4, atol=1e-5)


def test_relative_sparsity_and_unit_norms_under_each_parametrization():
    plain = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0.05, 0], [0, 0, 0.005], [0.0005, 0, 0]]))
    assert relative_sparsity(unit_norms(plain)) == {1e-1: 0.75, 1e-2: 0.5, 1e-3: 0.25}
    ewn = exp_weight_norm(nn.Linear(3, 4, bias=False))
    swn_layer = swn(nn.Linear(3, 4, bias=False))
    with torch.no_grad():
        ewn.parametrizations.weight.original0.copy_(torch.log(torch.tensor([[2.0], [0.1], [1.0], [0.001]])))
        swn_layer.parametrizations.weight.original0.copy_(torch.tensor([[-2.0], [0.1], [1.0], [0.001]]))
    assert unit_norms(ewn).tolist() == pytest.approx([2.0, 0.1, 1.0, 0.001])
    assert unit_norms(swn_layer).tolist() == pytest.approx([2.0, 0.1, 1.0, 0.001])
    assert relative_sparsity(unit_norms(ewn)) == {1e-1: 0.5, 1e-2: 0.25, 1e-3: 0.25}
    model = nn.Sequential(ewn, nn.ReLU(), swn_layer, nn.ReLU(), plain)
    assert list(layer_unit_norms(model, "normalized")) == ["0", "2"]
    assert list(layer_unit_norms(model, "all")) == ["0", "2", "4"]


def test_pruning_curve_zeroes_the_smallest_units():
    torch.manual_seed(0)
    model = mlp(2, bias_at=(), width=10, d_in=6, d_out=3)
    with torch.no_grad():
        model[0].weight.mul_(torch.arange(1, 11, dtype=torch.float32)[:, None])  # unit 0 smallest
    y = model(X).argmax(1)
    curve = pruning_curve(model, [(X, y)], fractions=(0.0, 0.1, 1.0))
    assert curve[0.0] == 1.0
    with torch.no_grad():
        model[0].weight[0].zero_()
        acc_without_unit0 = float((model(X).argmax(1) == y).double().mean())
    model[0].weight.data[0] = 1.0  # changed back to something: the curve must not depend on it now
    assert curve[0.1] == pytest.approx(acc_without_unit0)
    assert curve[1.0] == pytest.approx(float((y == 0).double().mean()))  # all hidden zero: logits 0, argmax 0


# -- detection: v of EWN and SWN is scale-invariant per unit --------------------------------------
def test_detection_finds_the_direction_of_ewn_and_swn_per_unit():
    from lightning_smd.core.detect import find_scale_invariant
    from lightning_smd.core.units import invariance_unit

    model = nn.Sequential(exp_weight_norm(nn.Linear(6, 8, bias=False)), nn.ReLU(),
                          swn(nn.Linear(8, 5, bias=False)), nn.ReLU(), swn(nn.Linear(5, 2), dim=1))
    found = find_scale_invariant(model, X)
    assert [c.name for c in found] == [f"{i}.parametrizations.weight.original1" for i in (0, 2, 4)]
    assert all(c.reason == "weight_norm direction" for c in found)
    assert all(c.weight_norm for c in found)
    units = [invariance_unit(model, c) for c in found]
    assert [(u.count, u.kind) for u in units] == [(8, "channel"), (5, "channel"), (1, "tensor")]


# -- HomogeneousCallback in a real Trainer.fit -------------------------------------------------------
def _lightning(namespace: str):
    import importlib

    return importlib.import_module("pytorch_lightning" if namespace == "pl" else "lightning.pytorch")


def _fit(namespace: str, tmp_path: Path, later_bias: bool, **callback_kwargs):
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_smd.homogeneous import HomogeneousCallback

    pl = _lightning(namespace)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(exp_weight_norm(nn.Linear(6, 16, bias=True)), nn.ReLU(),
                                     nn.Linear(16, 16, bias=later_bias), nn.ReLU(), nn.Linear(16, 3, bias=False))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    data = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True)
    callback = HomogeneousCallback(every_n_epochs=2, figures_dir=tmp_path / "figures", verbose=False, **callback_kwargs)
    trainer = pl.Trainer(max_epochs=3, logger=pl.loggers.CSVLogger(tmp_path), callbacks=[callback],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         log_every_n_steps=1)
    module = Module()
    trainer.fit(module, data)
    rows = list(csv.DictReader(open(Path(trainer.loggers[0].log_dir) / "metrics.csv")))
    return callback, module, rows, (X, y)


def test_callback_logs_the_contract_keys_through_the_trainer_loggers(tmp_path):
    callback, module, rows, (x, y) = _fit("pl", tmp_path, later_bias=False)
    logged = [r for r in rows if r.get("homogeneous/normalized_margin")]
    assert [int(r["step"]) for r in logged] == [4, 6]  # end of epoch 2 (every_n_epochs=2), end of training
    keys = {"homogeneous/degree", "homogeneous/param_norm", "homogeneous/normalized_margin", "homogeneous/margin/p05",
            "homogeneous/margin/p50", "homogeneous/support_count",
            *(f"homogeneous/relative_sparsity/{t}/net.0" for t in ("lt_1e-1", "lt_1e-2", "lt_1e-3"))}
    assert keys <= set(rows[0])
    assert float(logged[-1]["homogeneous/degree"]) == 3.0
    module.eval()
    with torch.no_grad():
        expected = normalized_margin(module(x), y, param_norm(module), 3)
    assert float(logged[-1]["homogeneous/normalized_margin"]) == pytest.approx(expected.normalized, rel=1e-5)
    assert float(logged[-1]["homogeneous/param_norm"]) == pytest.approx(param_norm(module), rel=1e-6)
    assert set(callback.figures) == {"margin", "sparsity", "pruning"}
    assert all(p.is_file() for p in callback.figures.values())
    assert callback.pruning is not None and set(callback.pruning) >= {0.0, 0.5}


def test_callback_refuses_a_non_homogeneous_model_and_logs_no_margin(tmp_path):
    from lightning_smd.homogeneous.callback import NotHomogeneousWarning

    with pytest.warns(NotHomogeneousWarning, match=r"net\.2\.bias") as record:
        callback, _, rows, _ = _fit("lightning", tmp_path, later_bias=True)  # the other namespace
    assert len([w for w in record if issubclass(w.category, NotHomogeneousWarning)]) == 1
    columns = set(rows[0])
    assert not any(c.startswith(("homogeneous/degree", "homogeneous/normalized_margin", "homogeneous/smoothed",
                                 "homogeneous/margin/", "homogeneous/support")) for c in columns)
    assert "homogeneous/param_norm" in columns  # measured, not refused: it does not need homogeneity
    assert "margin" not in callback.figures


def test_figures_draw_under_a_nested_prefix_and_callback_arguments_are_checked(tmp_path):
    from lightning_smd.homogeneous import figures
    from lightning_smd.homogeneous.callback import HomogeneousCallback

    history = [(s, {"homogeneous/ewn/normalized_margin": 1e-3 * s, "homogeneous/ewn/relative_sparsity/lt_1e-1/1": 0.1,
                    "homogeneous/ewn/min_relative_norm/1": 0.5}) for s in (10, 20)]
    assert figures.plot_margin({"": history}, tmp_path / "m.png", "homogeneous/ewn").is_file()
    assert figures.plot_sparsity({"": history}, tmp_path / "s.png", "homogeneous/ewn").is_file()
    assert figures.plot_margin({"": [(1, {"homogeneous/param_norm": 1.0})]}, tmp_path / "none.png") is None
    assert figures.plot_pruning({"EWN": {0.0: 1.0, 0.5: 0.9}}, tmp_path / "p.png").is_file()
    for bad, match in (({"every_n_epochs": 0}, "every_n_epochs"), ({"loss": "hinge"}, "loss"),
                       ({"max_batches": 0}, "max_batches"), ({"sparsity_layers": "some"}, "sparsity_layers")):
        with pytest.raises(ValueError, match=match):
            HomogeneousCallback(**bad)
    assert HomogeneousCallback(prefix="homogeneous/ewn", module="nets.ewn").state_key != HomogeneousCallback().state_key


@pytest.mark.slow
def test_smd_measures_the_direction_of_ewn_and_swn_per_unit(tmp_path):
    """SMDCallback on a weight-normalized network with weight decay: the direction v of each layer is
    detected, measured, and measured per output unit."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_smd import SMDCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(exp_weight_norm(nn.Linear(6, 16, bias=False)), nn.ReLU(),
                                     swn(nn.Linear(16, 3, bias=False)))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)

    y = (X[:, 0] > 0).long()
    smd = SMDCallback(log_every_n_steps=1, per_channel=2, verbose=False, figures_dir=str(tmp_path / "f"))
    trainer = pl.Trainer(max_steps=12, logger=pl.loggers.CSVLogger(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                         callbacks=[smd])
    trainer.fit(Module(), DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True))
    columns = set(next(csv.DictReader(open(Path(trainer.loggers[0].log_dir) / "metrics.csv"))))
    for layer in ("net.0", "net.2"):
        assert f"smd/angular_update/{layer}.parametrizations.weight.original1" in columns, sorted(columns)[:20]
    assert any(c.startswith("smd/channel/") and "net.0.parametrizations.weight.original1" in c for c in columns)
    units = {name: (u.count, u.kind) for name, u in smd.units.items()}
    assert units == {"net.0.parametrizations.weight.original1": (16, "channel"),
                     "net.2.parametrizations.weight.original1": (3, "channel")}


def _preset(tmp_path: Path, name: str, overrides: list[str]) -> tuple[dict, dict]:
    """Run ``experiment=name`` through examples/train.py's train(); returns (result, callbacks by prefix)."""
    from tests.examples_fixtures import composed

    from examples import train as train_module
    from lightning_smd.homogeneous.callback import HomogeneousCallback

    built = []
    original = train_module.build_callbacks
    train_module.build_callbacks = lambda cfg: built.extend(original(cfg)) or built
    try:
        with composed([f"experiment={name}", "print_config=false", "trainer.enable_progress_bar=false", *overrides],
                      tmp_path / "run") as cfg:
            result = train_module.train(cfg)
    finally:
        train_module.build_callbacks = original
    return result, {cb.prefix: cb for cb in built if isinstance(cb, HomogeneousCallback)}


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_ewn_vs_swn_preset_runs_through_train_and_logs_both_networks(tmp_path):
    """The user's path (examples/train.py's train() on the composed preset), a few steps."""
    result, callbacks = _preset(tmp_path, "ewn_vs_swn", ["trainer.max_epochs=2", "data.steps_per_epoch=3",
                                                        "callbacks.homogeneous_ewn.pruning_fractions=[0.0,0.5]"])
    assert set(callbacks) == {"homogeneous/ewn", "homogeneous/swn"}
    assert result["global_step"] == 6
    rows = list(csv.DictReader(open(result["metrics_csv"])))
    for name in ("ewn", "swn"):
        logged = [int(r["step"]) for r in rows if r.get(f"homogeneous/{name}/param_norm")]
        assert logged == [3, 6]
        assert f"homogeneous/{name}/relative_sparsity/lt_1e-2/1" in rows[0]
    assert callbacks["homogeneous/ewn"].pruning is not None and set(callbacks["homogeneous/ewn"].pruning) == {0.0, 0.5}


@pytest.mark.slow
def test_margin_digits_normalized_margin_rises_in_the_late_phase(tmp_path):
    result, callbacks = _preset(tmp_path, "margin_digits", ["trainer.max_epochs=20"])
    history = callbacks["homogeneous"].history
    assert [s for s, _ in history] == [100 * (i + 1) for i in range(20)]
    margins_ = [m["homogeneous/normalized_margin"] for _, m in history]
    late = [m for m in margins_ if m > 0]
    assert len(late) >= 15, margins_  # the data are separated early (step 300), the rest is the late phase
    assert all(b >= a for a, b in zip(late, late[1:])), late
    smoothed = [m["homogeneous/smoothed_margin"] for _, m in history if "homogeneous/smoothed_margin" in m]
    assert len(smoothed) >= 2 and all(b >= a for a, b in zip(smoothed, smoothed[1:]))  # defined from step 1800
    assert all(m["homogeneous/degree"] == 3.0 for _, m in history)
    rows = list(csv.DictReader(open(result["metrics_csv"])))
    assert sum(1 for r in rows if r.get("homogeneous/normalized_margin")) == 20


@pytest.mark.slow
def test_ewn_vs_swn_example_ewn_is_relatively_sparser(tmp_path):
    """The example, seeded (Morwani & Ramaswamy's asymptotic relative sparsity): after 500 steps of
    normalized gradient descent most hidden units of the EWN copy fall below r_u < 0.1 (and below
    0.01), while no unit of the SWN copy does; the sparsity emerges during training (none at the
    first measurement), pruning the smallest units costs EWN less, and every measurement of both
    networks has a margin (none dropped at the large logits of the late phase)."""
    result, callbacks = _preset(tmp_path, "ewn_vs_swn", [])
    ewn, swn_cb = callbacks["homogeneous/ewn"], callbacks["homogeneous/swn"]
    assert ewn.homogeneity.degree == 2.0 and swn_cb.homogeneity.degree == 2.0
    assert [s for s, _ in ewn.history] == [s for s, _ in swn_cb.history] == [50 * (i + 1) for i in range(10)]

    def fraction(cb, name, t, at=-1):
        return cb.history[at][1][f"homogeneous/{name}/relative_sparsity/{t}/1"]

    assert fraction(ewn, "ewn", "lt_1e-1", at=0) == 0.0  # not there at the start: it emerges
    assert fraction(ewn, "ewn", "lt_1e-1") > 0.5 > fraction(swn_cb, "swn", "lt_1e-1") == 0.0
    assert fraction(ewn, "ewn", "lt_1e-2") > fraction(swn_cb, "swn", "lt_1e-2")
    assert ewn.min_relative_norm["1"] < 0.01 and swn_cb.min_relative_norm["1"] > 0.1
    for name, cb in (("ewn", ewn), ("swn", swn_cb)):
        assert all(f"homogeneous/{name}/normalized_margin" in m for _, m in cb.history)
        assert cb.pruning is not None and cb.pruning[0.0] == 1.0
    assert all(ewn.pruning[p] >= swn_cb.pruning[p] for p in ewn.pruning)
    assert ewn.pruning[0.95] > swn_cb.pruning[0.95]
    columns = set(next(csv.DictReader(open(result["metrics_csv"]))))
    assert {"homogeneous/ewn/normalized_margin", "homogeneous/swn/normalized_margin",
            "train/log_loss_ewn", "homogeneous/ewn/layer_norm/1"} <= columns


def test_degree_and_margin_hold_at_margins_near_float32_limits():
    """Late in training (normalized GD on EWN) the logits reach ~1e19: the Euler check must not
    square them (‖f‖² overflows float32 in the backward pass) and the margin must stay finite."""
    torch.manual_seed(0)
    model = nn.Sequential(exp_weight_norm(nn.Linear(6, 16, bias=False)), nn.ReLU(),
                          exp_weight_norm(nn.Linear(16, 1, bias=False)))
    with torch.no_grad():
        model[2].parametrizations.weight.original0.fill_(45.0)  # ‖w_out‖ = e^45 ≈ 3.5e19
    out = model(X)
    assert torch.isfinite(out).all() and float(out.abs().max()) > 1e18
    result = homogeneity_degree(model, X)
    assert result.homogeneous and result.degree == 2, result.message()
    stats = normalized_margin(out.detach(), (out.detach().squeeze(1) > 0).long(), param_norm(model), 2,
                              loss="exponential")
    assert stats.normalized > 0 and math.isfinite(stats.normalized)


@pytest.mark.parametrize("classes", [1, 4])
def test_example_log_loss_matches_the_losses_and_stays_finite_at_large_margins(classes):
    """examples.modules.homogeneous.log_mean_loss (the objective of normalized gradient descent):
    log of the mean logistic / cross-entropy / exponential loss against brute force, and a finite
    value and gradient where the loss itself underflows."""
    from examples.modules.homogeneous import log_mean_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, classes, generator=gen, dtype=torch.float64) * 3
    y = torch.randint(0, max(classes, 2), (12,), generator=gen)
    if classes == 1:
        logistic = F.binary_cross_entropy_with_logits(logits.squeeze(1), y.double())
        q = (2 * y.double() - 1) * logits.squeeze(1)
        exponential = torch.exp(-q).mean()
    else:
        logistic = F.cross_entropy(logits, y)
        s = logits.gather(1, y[:, None]) - logits
        exponential = (torch.exp(-s).sum(1) - 1).mean()
    assert float(log_mean_loss(logits, y, "logistic")) == pytest.approx(math.log(float(logistic)), rel=1e-10)
    assert float(log_mean_loss(logits, y, "exponential")) == pytest.approx(math.log(float(exponential)), rel=1e-10)
    big = (logits.detach() * 1e4).float().requires_grad_(True)  # margins ~1e4: e^{-q} is 0 in float32
    fitted = (logits.squeeze(1) > 0).long() if classes == 1 else logits.argmax(1)  # every margin > 0
    for loss in ("logistic", "exponential"):
        value = log_mean_loss(big, fitted, loss)
        (grad,) = torch.autograd.grad(value, big)
        assert torch.isfinite(value) and float(value) < -100 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="model.loss"):
        log_mean_loss(logits, y, "hinge")


def test_weight_norm_comparison_normalizes_each_gradient_and_stops_clearly_on_overflow():
    """The ewn_vs_swn module: with normalized_gradient each network's gradient has norm 1 before the
    step (each its own), and logits that overflow stop training with an error naming the network."""
    from examples.modules.homogeneous import WeightNormComparison

    module = WeightNormComparison(num_classes=2, in_channels=1, image_size=3, widths=(5,), loss="exponential",
                                  normalized_gradient=True)
    module.log = lambda *a, **k: None  # no Trainer here
    x, y = torch.randn(8, 1, 3, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 4)
    module.training_step((x, y), 0).backward()
    module.on_before_optimizer_step(None)
    for net in module.nets.values():
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in net.parameters()))
        assert norm == pytest.approx(1.0, rel=1e-6)
    with torch.no_grad():
        for layer in (1, 3):  # γ of both layers 1e30: logits ~1e60 overflow float32 to ±inf
            module.nets["swn"][layer].parametrizations.weight.original0.fill_(1e30)
    with pytest.raises(FloatingPointError, match="SWN network's loss .* optimizer.lr"):
        module.training_step((x, y), 1)
    with pytest.raises(ValueError, match="model.loss"):
        WeightNormComparison(image_size=3, loss="hinge")
