"""Per-channel spherical motion: invariance units from detection, per-unit Δ_t and ‖w_t‖ against a
float64 brute force, the rescale's per-unit consistency, the per-channel metrics and the hot path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_smd import SMDCallback, theory
from lightning_smd.core.channels import STALL_RATIO, ChannelMetrics
from lightning_smd.core.detect import Candidate, structural_candidates
from lightning_smd.core.measure import GroupSlice, StepMeasurer, measurement_mode
from lightning_smd.core.rescale import rescale_
from lightning_smd.core.units import Unit, invariance_unit, invariance_units

OPTIMIZERS = {
    "sgdm": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
}


def gn_cnn() -> nn.Sequential:
    """GroupNorm with 4 groups of 4 channels, GroupNorm with one channel per group, BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, bias=False), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 8, 3), nn.GroupNorm(8, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


class QKNormBlock(nn.Module):
    """Attention with per-head QK-norm (LayerNorm / RMSNorm over the head dimension), then a
    LayerNorm over all features: q, k have one unit per head, fc one unit (the whole tensor)."""

    def __init__(self, embed: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, embed // heads
        self.q = nn.Linear(embed, embed, bias=False)
        self.k = nn.Linear(embed, embed, bias=False)
        self.v = nn.Linear(embed, embed)
        self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.RMSNorm(self.head_dim)
        self.fc = nn.Linear(embed, embed, bias=False)
        self.ln = nn.LayerNorm(embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        split = (b, t, self.heads, self.head_dim)
        q = self.q_norm(self.q(x).view(split)).transpose(1, 2)
        k = self.k_norm(self.k(x).view(split)).transpose(1, 2)
        v = self.v(x).view(split).transpose(1, 2)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, e)
        return self.ln(self.fc(a))


def _units_of(model: nn.Module, x: torch.Tensor) -> dict[str, Unit]:
    return invariance_units(model, structural_candidates(model, x))


def _scale_unit(p: torch.Tensor, units: int, j: int, factor: float) -> None:
    with torch.no_grad():
        p.view(units, -1)[j] *= factor


def test_units_from_detection_gn_cnn_and_qk_norm_and_each_unit_is_invariant():
    torch.manual_seed(0)
    cnn, x_cnn = gn_cnn(), torch.randn(4, 3, 12, 12)
    units = _units_of(cnn, x_cnn)
    assert units == {
        "0.weight": Unit(4, "group", "GroupNorm (1)"),
        "3.weight": Unit(8, "channel", "GroupNorm (4)"),
        "6.weight": Unit(8, "channel", "BatchNorm2d (7)"),
    }
    block, x_block = QKNormBlock(), torch.randn(2, 5, 16)
    units_block = _units_of(block, x_block)
    assert {n: (u.count, u.kind) for n, u in units_block.items()} == {
        "q.weight": (4, "head"), "k.weight": (4, "head"), "fc.weight": (1, "tensor")}
    # what makes them the units: scaling one unit alone leaves the output unchanged,
    # scaling a finer piece (half a unit) does not
    for model, x, found in ((cnn, x_cnn, units), (block, x_block, units_block)):
        model.train()
        params = dict(model.named_parameters())
        for name, unit in found.items():
            if unit.count == 1:
                continue
            p = params[name]
            base = model(x).detach()

            def change() -> float:
                with torch.no_grad():
                    return float((model(x) - base).abs().max() / base.abs().max())

            _scale_unit(p, unit.count, 1, 3.0)
            whole_unit = change()
            _scale_unit(p, unit.count, 1, 1 / 3.0)
            _scale_unit(p, 2 * unit.count, 2, 3.0)  # the first half of unit 1
            half_unit = change()
            _scale_unit(p, 2 * unit.count, 2, 1 / 3.0)
            assert whole_unit < 1e-3 and half_unit > 3e-3, (name, whole_unit, half_unit)  # up to the norms' eps


def test_unknown_or_functional_norms_are_one_unit():
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.LayerNorm(8))
    assert invariance_unit(model, Candidate("0.weight", "", "structural", norms=("1",))) == Unit(1, "tensor")
    functional = Candidate("0.weight", "", "structural", functional_norms=("F.layer_norm (in <root>)",))
    assert invariance_unit(model, functional) == Unit(1, "tensor")
    assert invariance_unit(model, Candidate("0.weight", "restored from checkpoint", "checkpoint")) == Unit(1, "tensor")
    assert invariance_unit(model, Candidate("0.weight", "", "structural", weight_norm=True)) == Unit(1, "tensor")
    both = nn.ModuleDict({"conv": nn.Conv2d(3, 8, 1), "bn": nn.BatchNorm2d(8), "gn": nn.GroupNorm(2, 8)})
    # feeding a BatchNorm and a GroupNorm: only the coarser unit is invariant for both
    assert invariance_unit(both, Candidate("conv.weight", "", "structural", norms=("bn", "gn"))).count == 2


class _OddNames(nn.Module):
    """Module names the human-readable reason cannot be parsed back from: parentheses, spaces, arrows."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({"conv": nn.Conv2d(3, 8, 3, bias=False), "bn (main) → x": nn.BatchNorm2d(8)})

    def forward(self, x):
        return self.blocks["bn (main) → x"](self.blocks["conv"](x))


def test_units_come_from_the_structured_evidence_not_the_sentence():
    model = _OddNames()
    found = structural_candidates(model, torch.randn(2, 3, 8, 8))
    assert found["blocks.conv.weight"].norms == ("blocks.bn (main) → x",)
    assert invariance_units(model, found)["blocks.conv.weight"] == Unit(8, "channel", "BatchNorm2d (blocks.bn (main) → x)")


def _brute_force(w_old: torch.Tensor, w_new: torch.Tensor, units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit, in float64 from copies: Δ (stable form) and ‖w_t‖."""
    rows_old = w_old.double().reshape(units, -1)
    rows_new = w_new.double().reshape(units, -1)
    u = rows_new - rows_old
    w_norm = rows_old.norm(dim=1)
    radial = (rows_old * u).sum(1) / w_norm
    perp = ((u * u).sum(1) - radial**2).clamp_min(0).sqrt()
    return torch.atan2(perp, w_norm + radial), w_norm


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("channels_last,piece_numel", [(False, None), (True, None), (True, 40)])
def test_per_unit_matches_float64_brute_force(opt_name, channels_last, piece_numel, monkeypatch):
    """Per-unit Δ_t and ‖w_t‖ against a float64 brute force; ``piece_numel``: the fused pass cut
    into tiny pieces (rows of a tensor split across pieces, sources formed piece by piece)."""
    if piece_numel is not None:
        from lightning_smd.core import measure

        monkeypatch.setitem(measure.PIECE_NUMEL, "cpu", piece_numel)
    torch.manual_seed(0)
    model = gn_cnn()
    x_shape = (4, 3, 12, 12)
    units = _units_of(model, torch.randn(x_shape))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = dict(model.named_parameters())
    names = list(units)
    tracked = [params[n] for n in names]
    counts = [units[n].count for n in names]
    assert channels_last == (not tracked[0].is_contiguous())
    opt = OPTIMIZERS[opt_name](model.parameters())
    mode = measurement_mode(opt, opt.param_groups[0])
    per_unit = StepMeasurer([GroupSlice(opt, 0, tracked, 0, mode, units=counts)])
    per_tensor = StepMeasurer([GroupSlice(opt, 0, tracked, 0, mode)])
    gen = torch.Generator().manual_seed(1)
    n, m = len(tracked), sum(counts)
    for step in range(4):
        x = torch.randn(x_shape, generator=gen)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        opt.zero_grad()
        (model(x) * torch.randn(4, 4, generator=gen)).sum().backward()
        per_unit.before_step()
        old = [p.detach().double().clone() for p in tracked]
        # the per-tensor measurer on the same step (buffer/grad modes read nothing before the step
        # but L; snapshot mode copies w_t: both measurers see the same step)
        per_tensor.before_step()
        opt.step()
        stats, _ = per_unit.after_step()
        reference, _ = per_tensor.after_step()
        assert stats.shape == (3, n + m)
        truth = [_brute_force(o, p.detach(), k) for o, p, k in zip(old, tracked, counts)]
        delta = torch.cat([d for d, _ in truth])
        norm = torch.cat([w for _, w in truth])
        assert torch.allclose(stats[0, n:].double(), delta, rtol=1e-4, atol=1e-9), (opt_name, step)
        assert torch.allclose(stats[1, n:].double(), norm, rtol=1e-5), (opt_name, step)
        # the tensor columns: the per-tensor statistics (the sum of the units' sums)
        assert torch.allclose(stats[:, :n], reference, rtol=1e-4, equal_nan=True)
        # the unit-gradient sample per unit: ‖g_u‖²‖w_u‖² (h̃ with momentum), finite and ≥ 0 without momentum
        assert torch.isfinite(stats[2, n:]).all()


def test_per_unit_heads_of_qk_norm_block_match_brute_force():
    torch.manual_seed(0)
    block = QKNormBlock()
    x = torch.randn(2, 5, 16)
    units = {n: u.count for n, u in _units_of(block, x).items()}
    params = dict(block.named_parameters())
    names = list(units)
    opt = torch.optim.AdamW(block.parameters(), lr=1e-2, weight_decay=0.1)
    measurer = StepMeasurer([GroupSlice(opt, 0, [params[n] for n in names], 0, "snapshot",
                                        units=[units[n] for n in names])])
    for _ in range(3):
        opt.zero_grad()
        block(torch.randn(2, 5, 16)).pow(3).mean().backward()
        measurer.before_step()
        old = [params[n].detach().double().clone() for n in names]
        opt.step()
        stats, _ = measurer.after_step()
        truth = [_brute_force(o, params[n].detach(), units[n]) for o, n in zip(old, names)]
        assert torch.allclose(stats[0, len(names):].double(), torch.cat([d for d, _ in truth]), rtol=1e-4)
        assert torch.allclose(stats[1, len(names):].double(), torch.cat([w for _, w in truth]), rtol=1e-5)


def test_rescale_leaves_every_units_ratio_to_theory_unchanged():
    """The k^(-1/4) rescale multiplies every unit by the same factor: after an LR drop by k with the
    rescale, every unit's Δ/Δ* is what it would have been without the drop (up to BN's eps)."""
    k = 10.0
    ratios = {}
    for drop in (False, True):
        torch.manual_seed(0)
        model = gn_cnn()
        x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
        units = _units_of(model, x)
        params = dict(model.named_parameters())
        names = list(units)
        tracked = [params[n] for n in names]
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        measurer = StepMeasurer([GroupSlice(opt, 0, tracked, 0, "buffer", units=[units[n].count for n in names])])
        gen = torch.Generator().manual_seed(2)
        batches = [torch.randn(8, 3, 12, 12, generator=gen) for _ in range(4)]
        for i, batch in enumerate(batches):
            if i == 3 and drop:
                g = opt.param_groups[0]
                factor = theory.rescale_factor(g["lr"], g["lr"] / k, g["weight_decay"])
                assert factor == pytest.approx(k ** -0.25)
                rescale_(tracked, factor, opt)
                g["lr"] /= k
            opt.zero_grad()
            model(batch).logsumexp(dim=1).mean().backward()
            if i == 3:
                measurer.before_step()
            opt.step()
        stats, _ = measurer.after_step()
        g = opt.param_groups[0]
        delta_star = theory.from_param_group(opt, g).angular_update
        ratios[drop] = stats[0, len(names):].double() / delta_star
    assert ratios[True].shape == ratios[False].shape and ratios[True].numel() == 4 + 8 + 8
    assert torch.allclose(ratios[True], ratios[False], rtol=2e-3)


def _sgdm_theory(lr=0.1, wd=5e-4):
    return theory.GroupTheory("sgdm", lr, wd, momentum=0.9)


def test_channel_metrics_percentiles_and_stalled_units():
    group = _sgdm_theory()
    delta_star = group.angular_update
    metrics = ChannelMetrics(window=100, ema_steps=50)
    rng = np.random.default_rng(0)
    counts = [10, 4]
    stalled = {}
    for step in range(0, 301, 50):
        delta = delta_star * rng.uniform(0.8, 1.2, size=14)
        delta[:3] = 0.01 * delta_star  # three dead filters in the first tensor
        if step < 200:
            delta[10] = 0.0  # one filter of the second tensor stalls, then recovers
        norms = rng.uniform(1, 2, size=14)
        units = np.stack([delta, norms, rng.uniform(0.5, 1.5, size=14)])
        out = metrics.build(units, ["a", "b"], counts, [group, group], step, step)
        stalled[step] = (out["smd/channel/stalled_fraction/a"], out["smd/channel/stalled_fraction/b"])
        assert out["smd/channel/angular_update/p50/a"] == pytest.approx(np.percentile(delta[:10], 50))
        assert out["smd/channel/weight_norm/p95/b"] == pytest.approx(np.percentile(norms[10:], 95))
        assert out["smd/channel/angular_update_ratio/p05"] == pytest.approx(np.percentile(delta / delta_star, 5))
        assert out["smd/channel/weight_norm_theory/p50/a"] > 0
    # below STALL_RATIO for the whole window (100 steps) before it counts
    assert stalled[0] == stalled[50] == (0.0, 0.0)
    assert stalled[100] == (0.3, 0.25) and stalled[150] == (0.3, 0.25)
    assert stalled[200] == (0.3, 0.0)
    assert STALL_RATIO == 0.1


def test_muon_units_are_judged_against_their_own_matrix_delta_star():
    """Muon's Δ* depends on the matrix shape: a tensor's units are judged against that tensor's Δ*
    (what its ``smd/angular_update_theory`` logs), not the group's largest matrix's."""
    from types import SimpleNamespace

    from lightning_smd.core.result import Labeller
    from lightning_smd.core.steps import Finished

    params = [nn.Parameter(torch.randn(16, 64)), nn.Parameter(torch.randn(256, 16))]
    opt = torch.optim.Muon(params, lr=0.02, weight_decay=0.1)
    group = theory.from_param_group(opt, opt.param_groups[0])
    stars = [group.angular_update_for(p.shape) for p in params]
    assert abs(stars[1] / stars[0] - 1) > 0.01 and abs(stars[0] / group.angular_update - 1) > 0.01  # two shapes, three Δ*
    counts = [len(p) for p in params]
    delta = np.concatenate([np.full(16, stars[0]), np.full(256, 0.5 * stars[1])])
    stats = torch.tensor(np.concatenate([np.stack([[stars[0], 0.5 * stars[1]], [1.0, 1.0], [1.0, 1.0]]),
                                         np.stack([delta, np.ones(272), np.ones(272)])], axis=1))
    s = GroupSlice(opt, 0, params, 0, "snapshot", units=counts)
    finished = Finished(1, 1, stats, [s], [group])
    tracked = SimpleNamespace(names=["wide", "tall"], groups=["pg0", "pg0"])
    result = Labeller().label(stats, finished, tracked)
    assert result.delta_star.tolist() == pytest.approx(stars)
    assert result.unit_delta_star.tolist() == pytest.approx(stars)
    out = ChannelMetrics(window=100, ema_steps=50).build(
        result.units, result.unit_names, result.unit_counts, result.unit_theories, 1, 1,
        delta_star=result.unit_delta_star)
    # every unit of "wide" at 1.0 × its Δ*, every unit of "tall" at 0.5 ×
    assert out["smd/channel/angular_update_ratio/p05"] == pytest.approx(0.5)
    assert out["smd/channel/angular_update_ratio/p95"] == pytest.approx(1.0)


def test_callback_logs_per_channel_metrics_with_one_transfer(tmp_path):
    from tests.helpers import fit, read_metrics
    from tests.models import DigitsCNN
    from tests.core.test_hot_path import HostSyncRecorder, _StepEnd, _StepStart

    torch.manual_seed(0)
    recorder = HostSyncRecorder()
    smd = SMDCallback(log_every_n_steps=2, per_channel=4, verbose=False, figures_dir=str(tmp_path / "fig"))
    trainer = fit(DigitsCNN(), tmp_path, [_StepStart(recorder, smd), smd, _StepEnd(recorder)], max_steps=16,
                  log_every_n_steps=2)
    assert {n: (u.count, u.kind) for n, u in smd.units.items()} == {
        "model.0.weight": (16, "channel"), "model.3.weight": (32, "channel"), "model.7.weight": (32, "channel")}
    per_channel_steps = [s for s, _ in smd.records if (s + 1) % 4 == 0]
    assert per_channel_steps
    for s in (s for s, _ in smd.records):
        transfers = [e for e in recorder.events.get(s, []) if e["transfer"]]
        assert len(transfers) == 1
        assert transfers[0]["shape"] == ((3, 3 + 80) if s in per_channel_steps else (3, 3)), (s, transfers)
    logged = read_metrics(trainer)
    for name in smd.units:
        for kind in ("angular_update", "weight_norm"):
            for p in ("p05", "p50", "p95"):
                assert set(logged[f"smd/channel/{kind}/{p}/{name}"]) == set(per_channel_steps)
        assert set(logged[f"smd/channel/stalled_fraction/{name}"]) == set(per_channel_steps)
        # the per-tensor keys are unchanged, logged on every measured step
        assert set(logged[f"smd/angular_update/{name}"]) == {s for s, _ in smd.records}
    assert set(logged["smd/channel/angular_update_ratio/p50"]) == set(per_channel_steps)


def test_per_channel_off_logs_no_channel_keys(tmp_path):
    from tests.helpers import fit, read_metrics
    from tests.models import DigitsCNN

    torch.manual_seed(0)
    smd = SMDCallback(log_every_n_steps=2, per_channel=False, verbose=False, figures_dir=str(tmp_path / "fig"))
    trainer = fit(DigitsCNN(), tmp_path, [smd], max_steps=8, log_every_n_steps=2)
    assert not [k for k in read_metrics(trainer) if k.startswith("smd/channel/")]
    assert smd._tracked.recorder.slices[0].units is None


@pytest.mark.parametrize("bad", ["yes", 0, -3, 1.5, None])
def test_per_channel_argument_validation(bad):
    with pytest.raises(ValueError, match="per_channel"):
        SMDCallback(per_channel=bad)


def test_default_measures_per_channel_on_every_measured_step():
    """per_channel=True: per-unit statistics on every measured step, at any cadence (they are the
    row sums the per-tensor ones are summed from); per_channel=N keeps one block of N steps."""
    from lightning_smd.lightning.callback import DEFAULT_CHANNEL_EVERY
    from lightning_smd.core.steps import samples_unit_grad

    assert SMDCallback().channel_every == DEFAULT_CHANNEL_EVERY == 1
    assert SMDCallback(per_channel=7).channel_every == 7
    assert all(samples_unit_grad(s + 1, 1, DEFAULT_CHANNEL_EVERY) for s in range(1000))
    assert all(samples_unit_grad(s + 1, 50, DEFAULT_CHANNEL_EVERY) for s in range(49, 1000, 50))
    every_step_thinned = [s for s in range(1000) if samples_unit_grad(s + 1, 1, 50)]
    assert every_step_thinned == list(range(49, 1000, 50))
