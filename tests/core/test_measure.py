"""Measurement: the stable angle formula and every update-recovery mode against float64 truth."""

import math

import pytest
import torch

from lightning_smd.core.measure import GroupSlice, StepMeasurer, angular_update, measurement_mode


def _rotate(w: torch.Tensor, angle: float, gen: torch.Generator) -> torch.Tensor:
    """w turned by exactly `angle` (computed in float64), same norm."""
    w64 = w.double().reshape(-1)
    d = torch.randn(w64.shape, generator=gen, dtype=torch.float64)
    d -= (d @ w64) / (w64 @ w64) * w64
    d *= w64.norm() / d.norm()
    return (math.cos(angle) * w64 + math.sin(angle) * d).reshape(w.shape)


@pytest.mark.parametrize("angle", [1e-4, 3e-4, 1e-3, 1e-2])
def test_stable_formula_accurate_in_fp32(angle):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, 3, 3, generator=gen)
    w_new = _rotate(w, angle, gen).float()
    # the truth for the fp32 pair itself, in float64
    truth = float(angular_update(w.double(), w_new.double()))
    assert truth == pytest.approx(angle, rel=2e-3)  # rounding of w_new to fp32 is tiny
    measured = float(angular_update(w, w_new))
    assert measured == pytest.approx(truth, rel=1e-2)
    naive = float(torch.acos(((w.flatten() @ w_new.flatten()) / (w.norm() * w_new.norm())).clamp(max=1)))
    if angle <= 3e-4:  # what the stable formula is for: acos of an fp32 cosine fails here
        assert abs(naive - truth) / truth > 0.1


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    )


def _lion(p, weight_decay=0.5, **kw):
    from lion_pytorch import Lion

    return Lion(p, lr=1e-3, weight_decay=weight_decay, **kw)


OPTIMIZERS = {
    "sgdm": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=5e-4),
    "sgd_dampening": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=5e-4),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, amsgrad=True),
    "adamw_single_tensor": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, foreach=False),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=5e-4),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, fused=True),
    "lion": _lion,
    "lion_decoupled": lambda p: _lion(p, weight_decay=1e-4, decoupled_weight_decay=True),  # ηλ = 1e-4
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, weight_decay=5e-4),
    "sgd_foreach_off": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=False),
}
EXPECTED_MODE = {"sgdm": "buffer", "sgd": "grad", "sgd_dampening": "buffer", "nesterov": "nesterov",
                 "adamw": "adam", "adamw_amsgrad": "adam", "adamw_single_tensor": "adam", "adam": "adam",
                 "adamw_fused": "snapshot", "lion": "lion", "lion_decoupled": "lion", "rmsprop": "snapshot",
                 "sgd_foreach_off": "buffer"}


def _check_step(measurer, opt, tracked, step_fn, opt_name, clip=False, steps=6):
    """Run ``steps`` measured steps; Δ_t and ‖w_t‖ within 1e-4 relative of the float64 truth from copies."""
    for step in range(steps):
        step_fn()
        before = [c.detach().clone() for c in tracked]
        grads = [c.grad.detach().clone() for c in tracked]
        buffers = [opt.state[c].get("momentum_buffer") if c in opt.state else None for c in tracked]
        buffers = [b.clone() if b is not None else None for b in buffers]
        measurer.before_step()
        if clip:  # clipping happens after on_before_optimizer_step in Lightning
            torch.nn.utils.clip_grad_norm_(tracked, 0.05)
        opt.step()
        stats, slices = measurer.after_step()
        assert stats.shape == (3, len(tracked))
        for i, c in enumerate(tracked):
            truth = float(angular_update(before[i].double(), c.detach().double()))
            assert float(stats[0, i]) == pytest.approx(truth, rel=1e-4, abs=1e-9), (opt_name, step, i)
            assert float(stats[1, i]) == pytest.approx(float(before[i].double().norm()), rel=1e-5)
            g_sq = float(grads[i].double().pow(2).sum())
            h = g_sq
            if opt_name in ("sgdm", "sgd_foreach_off", "sgd_dampening") and buffers[i] is not None:
                damp = 0.3 if opt_name == "sgd_dampening" else 0.0
                h += 2 * 0.9 * float(buffers[i].double().flatten() @ grads[i].double().flatten()) / (1 - damp)
            assert float(stats[2, i]) == pytest.approx(h * float(before[i].double().pow(2).sum()), rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("clip", [False, True])
def test_modes_match_float64_truth(opt_name, clip):
    """Every optimizer's exact angle without a copy of the weights (snapshot only where the mode says)."""
    model = _model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    convs = [model[0].weight, model[3].weight]
    mode = measurement_mode(opt, opt.param_groups[0])
    assert mode == EXPECTED_MODE[opt_name]
    s = GroupSlice(opt, 0, convs, 0, mode)
    measurer = StepMeasurer([s])
    gen = torch.Generator().manual_seed(1)

    def step_fn():
        x = torch.randn(8, 3, 12, 12, generator=gen)
        y = torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    _check_step(measurer, opt, convs, step_fn, opt_name, clip)
    assert s.snapshot is None  # nothing the size of the weights is held between steps


def test_muon_matches_float64_truth_from_a_transient_snapshot():
    """torch.optim.Muon: its Newton–Schulz update cannot be rebuilt cheaply, so w_t is copied for
    the step and released after it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16, bias=False), torch.nn.LayerNorm(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 16, bias=False), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    tracked = [model[0].weight, model[3].weight]
    opt = torch.optim.Muon(tracked, lr=0.02, weight_decay=0.1)
    mode = measurement_mode(opt, opt.param_groups[0])
    assert mode == "snapshot"
    s = GroupSlice(opt, 0, tracked, 0, mode)
    measurer = StepMeasurer([s])
    gen = torch.Generator().manual_seed(1)

    def step_fn():
        opt.zero_grad()
        model(torch.randn(8, 12, generator=gen)).pow(2).mean().backward()

    _check_step(measurer, opt, tracked, step_fn, "muon")
    assert s.snapshot is None


def test_row_sums_bucketed_equal_float64_truth():
    """The fused row pass: small same-shape tensors reduced together (concatenated), large ones
    where they lie, channels_last views, missing partners; per row and in plan order."""
    from lightning_smd.core.measure import RowPlan, row_sums

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 8, 3, 3, generator=gen), torch.randn(32, 16, generator=gen),
          torch.randn(8, 8, 3, 3, generator=gen), torch.randn(300, 256, generator=gen),
          torch.randn(8, 4, 5, 5, generator=gen).to(memory_format=torch.channels_last),
          torch.randn(12, 16, generator=gen)]
    ys = [torch.randn(16, 8, 3, 3, generator=gen), None, torch.randn(8, 8, 3, 3, generator=gen),
          torch.randn(300, 256, generator=gen), None, torch.randn(12, 16, generator=gen)]
    ys[4] = torch.randn_like(xs[4])
    plan = RowPlan.build(xs, [1] * len(xs))
    assert [0, 2] in plan.buckets and [1, 5] in plan.buckets and [3] in plan.buckets
    sums = row_sums(xs, ys, "xyd", plan)
    order = plan.row_tensor()
    within = plan.row_in_tensor()
    assert [plan.rows[i] for i in range(len(xs))] == [16, 32, 8, 1, 1, 12]  # shared buckets: per channel
    for col, (i, r) in enumerate(zip(order, within)):
        x = xs[i].double().reshape(plan.rows[i], -1)[r]
        y = ys[i].double().reshape(plan.rows[i], -1)[r] if ys[i] is not None else torch.zeros_like(x)
        expected = torch.tensor([x @ x, y @ y, x @ y], dtype=torch.float64)
        scale = float(x @ x + y @ y)  # fp32 accumulation: errors relative to the norms, not to a small dot
        torch.testing.assert_close(sums[:, col].double(), expected, rtol=1e-5, atol=1e-6 * scale)


def test_snapshot_is_transient():
    """Snapshot mode (an optimizer whose update cannot be rebuilt) copies w_t for the step only."""
    model = _model()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    s = GroupSlice(opt, 0, [model[0].weight], 0, "snapshot")
    measurer = StepMeasurer([s])
    for _ in range(2):
        model(torch.randn(4, 3, 8, 8)).sum().backward()
        measurer.before_step()
        assert s.snapshot is not None and s.snapshot[0].data_ptr() != model[0].weight.data_ptr()
        opt.step()
        measurer.after_step()
        assert s.snapshot is None


def test_reduce_fn_receives_partial_sums_once():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    calls = []

    def reduce(sums):
        calls.append(sums.shape)
        return sums

    measurer = StepMeasurer([GroupSlice(opt, 0, [model[0].weight, model[3].weight], 0, "buffer")], reduce)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    measurer.before_step()
    opt.step()
    measurer.after_step()
    assert calls == [torch.Size([5, 2])]


def test_unit_gradient_sampling_depends_on_the_step_alone():
    from lightning_smd.core.steps import samples_unit_grad

    assert [s for s in range(20) if samples_unit_grad(s, 1, 4)] == [0, 4, 8, 12, 16]
    assert [s for s in range(1, 20, 2) if samples_unit_grad(s, 2, 4)] == [1, 5, 9, 13, 17]
    every_50 = range(49, 500, 50)
    assert all(samples_unit_grad(s, 50, 4) for s in every_50)  # the default cadence samples every time


def test_tensor_without_gradient_reads_zero_angle():
    """A tracked tensor that got no gradient has no momentum buffer after the step: Δ = 0, ‖w‖ exact."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    unused = torch.nn.Parameter(torch.randn(4, 4, 3, 3))
    opt.add_param_group({"params": [unused], "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4})
    measurer = StepMeasurer([GroupSlice(opt, 0, [model[0].weight], 0, "buffer"),
                             GroupSlice(opt, 1, [unused], 1, "buffer")])
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    measurer.before_step()
    opt.step()
    stats, _ = measurer.after_step()
    assert float(stats[0, 0]) > 0 and float(stats[0, 1]) == 0.0
    assert float(stats[1, 1]) == pytest.approx(float(unused.detach().double().norm()), rel=1e-6)


def test_each_optimizer_reduces_only_its_own_tensors():
    """Two optimizers (a GAN): each measurer's partial sums hold its own columns, so its reduce
    function must be built from its own tensors (with several shard layouts the columns matter)."""
    from lightning_smd.core.steps import StepRecorder

    a, b, c = (torch.nn.Parameter(torch.randn(3, 2)) for _ in range(3))
    opt1, opt2 = torch.optim.SGD([a, b], lr=0.1), torch.optim.SGD([c], lr=0.1)
    seen = []

    def make_reduce(params):
        seen.append([id(p) for p in params])
        return lambda sums: sums

    slices = [GroupSlice(opt1, 0, [a, b], 0, "grad"), GroupSlice(opt2, 0, [c], 2, "grad")]
    StepRecorder(slices, make_reduce)
    assert seen == [[id(a), id(b)], [id(c)]]


@pytest.mark.parametrize("opt_name", ["sgdm", "sgd", "nesterov", "adamw", "adamw_amsgrad", "lion"])
def test_small_tensors_reduced_together_match_float64_truth(opt_name):
    """Same-shape small tensors are concatenated and their sources formed in one call per bucket:
    the angles still match the float64 truth per tensor, and per unit."""
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(6, 6, bias=False), torch.nn.BatchNorm1d(6), torch.nn.ReLU())
              for _ in range(4)]
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), *blocks, torch.nn.Linear(6, 3))
    tracked = [b[0].weight for b in blocks]
    opt = OPTIMIZERS[opt_name](model.parameters())
    s = GroupSlice(opt, 0, tracked, 0, measurement_mode(opt, opt.param_groups[0]))
    from lightning_smd.core.measure import RowPlan

    assert RowPlan.build(tracked, [1] * 4).buckets == [[0, 1, 2, 3]]
    measurer = StepMeasurer([s])
    gen = torch.Generator().manual_seed(1)

    def step_fn():
        opt.zero_grad()
        model(torch.randn(16, 5, generator=gen)).pow(2).mean().backward()

    _check_step(measurer, opt, tracked, step_fn, opt_name, steps=4)


@pytest.mark.parametrize("piece_numel", [8, 80])
@pytest.mark.parametrize("opt_name", ["sgdm", "nesterov", "adamw", "lion"])
def test_pass_cut_into_pieces_matches_float64_truth(opt_name, piece_numel, monkeypatch):
    """The fused pass runs in cache-sized pieces: a tensor cut into several flat pieces, small
    tensors concatenated several to a piece or one per piece, sources formed piece by piece in the
    scratch buffers. The angles still match the float64 truth."""
    from lightning_smd.core import measure

    monkeypatch.setitem(measure.PIECE_NUMEL, "cpu", piece_numel)
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(6, 6, bias=False), torch.nn.BatchNorm1d(6), torch.nn.ReLU())
              for _ in range(4)]
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), *blocks, torch.nn.Linear(6, 3))
    tracked = [model[0].weight] + [b[0].weight for b in blocks]
    opt = OPTIMIZERS[opt_name](model.parameters())
    s = GroupSlice(opt, 0, tracked, 0, measurement_mode(opt, opt.param_groups[0]))
    plan = measure.RowPlan.build(tracked, [1] * len(tracked))
    kinds = [p.kind for p in plan.pieces]
    if piece_numel == 8:  # 30 elements in 4 flat pieces, then one 6×6 tensor per piece
        assert kinds == ["flat"] * 4 + ["cat"] * 4
    else:  # 30 elements in one piece; three 6×6 tensors (108 ≥ 80 elements), then the fourth
        assert kinds == ["flat", "cat", "cat"] and [len(p.tensors) for p in plan.pieces] == [1, 3, 1]
    measurer = StepMeasurer([s])
    gen = torch.Generator().manual_seed(1)

    def step_fn():
        opt.zero_grad()
        model(torch.randn(16, 5, generator=gen)).pow(2).mean().backward()

    _check_step(measurer, opt, tracked, step_fn, opt_name, steps=4)
