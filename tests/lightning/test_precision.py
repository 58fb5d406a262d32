"""16-mixed with a GradScaler: overflow steps (skipped by the scaler while global_step and the
schedulers advance) are not logged as Δ=0, later steps are exact, and fused optimizers (which
unscale inside their step, so the hook sees scaled gradients) give the same statistics.

Lightning turns ``precision="16-mixed"`` on CPU into bf16-mixed, so the test passes Lightning's own
``MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu"))`` plugin: the real fp16 autocast +
GradScaler code path (unscale_, on_before_optimizer_step, scaler.step/update).
"""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.plugins import MixedPrecision

from tests.setups_common import TinyNet, WeightRecorder, metrics_of, run_setup

STEPS, OVERFLOW = 12, 7
NAMES = ("net.0.weight", "net.3.weight")


class Overflowing(TinyNet):
    """Puts an inf into one (scaled) gradient at step OVERFLOW, as an fp16 overflow would."""

    def on_after_backward(self):
        if self.global_step == OVERFLOW:
            with torch.no_grad():
                self.net[0].weight.grad[0, 0] = float("inf")


def _run(tmp_path, optimizer, fused):
    recorder = WeightRecorder()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    name = f"{optimizer}-fused{fused}"
    trainer, cb = run_setup(tmp_path, name, steps=STEPS, plugins=[plugin], callbacks=[recorder], module_cls=Overflowing,
                            model_kwargs={"optimizer": optimizer, "fused": fused})
    return trainer, cb, recorder, metrics_of(tmp_path, name), plugin.scaler


@pytest.mark.parametrize("optimizer, fused", [("sgdm", False), ("sgdm", True), ("sgd", True)])
def test_grad_scaler_overflow_step_is_not_logged(tmp_path, optimizer, fused):
    trainer, cb, recorder, m, scaler = _run(tmp_path, optimizer, fused)
    assert trainer.global_step == STEPS  # the skipped step still counts
    assert scaler.get_scale() < 2.0**10  # the scaler backed off once
    assert set(cb.candidates) == set(NAMES)
    assert cb.skipped_steps == 1
    if fused and optimizer == "sgd":
        assert {s.mode for s in cb._measurer.slices} == {"snapshot"}  # gradients stay scaled after a fused step
    for name in NAMES:
        logged = m[f"smd/angular_update/{name}"]
        truth = recorder.true_angles(name)
        assert truth[OVERFLOW] == 0.0  # nothing moved...
        assert OVERFLOW not in logged  # ...and the step is not logged as Δ=0
        assert sorted(logged) == [s for s in range(4, STEPS) if s != OVERFLOW]
        for step, value in logged.items():  # every other step (before and after the skip) is exact
            assert value == pytest.approx(truth[step], rel=1e-4, abs=1e-8), (name, step)


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_fused_optimizer_gradient_statistics_are_unscaled(tmp_path):
    """The hook sees scale × g under a fused optimizer: L (‖g‖²‖w‖², h̃) must not depend on it."""
    *_, plain, _ = _run(tmp_path, "sgdm", False)
    *_, fused, _ = _run(tmp_path, "sgdm", True)
    for name in NAMES:
        for key in (f"smd/unit_grad_sq/{name}", f"smd/weight_norm/{name}", f"smd/angular_update/{name}"):
            assert sorted(fused[key]) == sorted(plain[key])
            for step, value in plain[key].items():
                assert fused[key][step] == pytest.approx(value, rel=1e-3), (key, step)


# --------------------------------------------------------------------------------------------
# Every parameter dtype: detection and measurement (issue 12)
# --------------------------------------------------------------------------------------------

import warnings  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
from torch import nn  # noqa: E402

from lightning_smd.core.detect import RadialCosineCheck, find_scale_invariant  # noqa: E402


def _convnet(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_find_scale_invariant_every_dtype(dtype):
    model = _convnet(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing structural may be dropped at the dtype's precision
        found = [c.name for c in find_scale_invariant(model, torch.randn(4, 3, 16, 16, dtype=dtype))]
    assert found == ["0.weight", "3.weight"]


def test_find_scale_invariant_mixed_dtypes():
    """A float64 trunk with a float32 head (and a cast between them)."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = _convnet(torch.float64)[:6]
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.trunk(x.double()).mean(dim=(2, 3)).float())

    found = [c.name for c in find_scale_invariant(Mixed(), torch.randn(4, 3, 16, 16))]
    assert found == ["trunk.0.weight", "trunk.3.weight"]


def test_radial_cosine_float64_stays_float64_and_16_bit_accumulates_in_fp32():
    torch.manual_seed(0)
    w64 = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    w16 = torch.randn(1000, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1000, dtype=torch.float64)
    g = g - (g @ w64.detach()) / (w64.detach() @ w64.detach()) * w64.detach()  # exactly tangential in fp64
    w64.grad = g
    w16.grad = torch.randn(1000).to(torch.bfloat16)
    check = RadialCosineCheck([("a", w64), ("b", w16)])
    check.update()
    result = check.result()
    assert result["a"] < 1e-13  # float32 accumulation would give ~1e-8
    expected = abs(float(w16.detach().float() @ w16.grad.float())) / (
        float(w16.detach().float().norm()) * float(w16.grad.float().norm()))
    assert result["b"] == pytest.approx(expected, rel=1e-4)


class _DoubleRecorder(pl.Callback):
    """Float64 copies of the weights at each batch start: the true angular update in float64."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append({n: p.detach().double().clone() for n, p in pl_module.named_parameters()})

    def on_fit_end(self, trainer, pl_module):
        self.on_train_batch_start(trainer, pl_module, None, 0)


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_callback_fit_with_float64_and_16_bit_parameters(tmp_path, precision):
    recorder = _DoubleRecorder()
    trainer, cb = run_setup(tmp_path, precision, steps=8, precision=precision, callbacks=[recorder])
    assert next(trainer.lightning_module.parameters()).dtype == (
        torch.float64 if precision == "64-true" else torch.bfloat16)
    assert set(cb.candidates) == set(NAMES)
    m = metrics_of(tmp_path, precision)
    rel = 1e-9 if precision == "64-true" else 2e-2
    for name in NAMES:
        logged = m[f"smd/angular_update/{name}"]
        assert logged
        for step, value in logged.items():
            a, b = recorder.weights[step][name].reshape(-1), recorder.weights[step + 1][name].reshape(-1)
            a, b = a / a.norm(), b / b.norm()
            truth = float(2 * torch.atan2((a - b).norm(), (a + b).norm()))
            assert value == pytest.approx(truth, rel=rel), (name, step)
