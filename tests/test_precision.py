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


def test_fused_optimizer_gradient_statistics_are_unscaled(tmp_path):
    """The hook sees scale × g under a fused optimizer: L (‖g‖²‖w‖², h̃) must not depend on it."""
    *_, plain, _ = _run(tmp_path, "sgdm", False)
    *_, fused, _ = _run(tmp_path, "sgdm", True)
    for name in NAMES:
        for key in (f"smd/unit_grad_sq/{name}", f"smd/weight_norm/{name}", f"smd/angular_update/{name}"):
            assert sorted(fused[key]) == sorted(plain[key])
            for step, value in plain[key].items():
                assert fused[key][step] == pytest.approx(value, rel=1e-3), (key, step)
