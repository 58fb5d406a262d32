"""Measurement at torch's own step hooks: the step that really happens is the one measured.

* Under gradient clipping the L sample is the clipped gradient's (Lightning's
  ``on_before_optimizer_step`` runs before clipping; the measurement must not).
* Two steps of one optimizer in one batch (manual optimization) are two measured steps, each with
  its own Δ_t (not the combined angle of both).
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from lightning_smd import EstimateOptions, SMDCallback
from tests.setups_common import TinyNet, metrics_of, run_setup

NAMES = ("net.0.weight", "net.3.weight")


class GradientProbe(pl.Callback):
    """‖g‖² per tracked tensor before clipping (Lightning's hook) and after the step (the clipped
    gradient the optimizer used: Lightning zeroes gradients only in the next batch's closure)."""

    def __init__(self) -> None:
        self.unclipped: dict[int, dict[str, float]] = {}
        self.clipped: dict[int, dict[str, float]] = {}

    def _read(self, trainer, pl_module) -> dict[str, float]:
        params = dict(pl_module.named_parameters())
        return {n: float(params[n].grad.double().pow(2).sum()) for n in NAMES}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.unclipped[trainer.fit_loop.epoch_loop._batches_that_stepped] = self._read(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clipped[trainer.fit_loop.epoch_loop._batches_that_stepped] = self._read(trainer, pl_module)


@pytest.mark.slow
def test_unit_gradient_sample_is_the_clipped_gradients(tmp_path):
    probe = GradientProbe()
    # ema_steps tiny: the logged running L is the latest sample itself; SGD without momentum: the
    # sample is ‖g‖²‖w_t‖² exactly
    run_setup(tmp_path, "clip", steps=10, model_kwargs={"optimizer": "sgd"}, callbacks=[probe],
              callback_kwargs={"estimates": EstimateOptions(ema_steps=1e-3, unit_grad_every=1)},
              gradient_clip_val=0.01)
    m = metrics_of(tmp_path, "clip")
    for name in NAMES:
        logged = m[f"smd/unit_grad_sq/{name}"]
        assert len(logged) >= 5
        for step, value in logged.items():
            w_sq = m[f"smd/weight_norm/{name}"][step] ** 2
            assert probe.unclipped[step][name] > 4 * probe.clipped[step][name]  # clipping did act
            assert value == pytest.approx(probe.clipped[step][name] * w_sq, rel=1e-3), (name, step)


class TwoStepsPerBatch(TinyNet):
    """Manual optimization: one SGD optimizer steps twice per batch (on the two halves of it).
    ``angles`` keeps the true angle of every step: ``{name: [Δ of each step]}``."""

    def __init__(self, **kw):
        super().__init__(optimizer="sgd", **kw)
        self.automatic_optimization = False
        self.angles: dict[str, list[float]] = {n: [] for n in NAMES}

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        params = dict(self.named_parameters())
        for half in (slice(0, len(x) // 2), slice(len(x) // 2, None)):
            before = {n: params[n].detach().double().clone() for n in NAMES}
            loss = torch.nn.functional.cross_entropy(self(x[half]), y[half])
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()
            for n in NAMES:
                a, b = before[n].reshape(-1), params[n].detach().double().reshape(-1)
                a, b = a / a.norm(), b / b.norm()
                self.angles[n].append(float(2 * torch.atan2((a - b).norm(), (a + b).norm())))


@pytest.mark.slow
def test_two_steps_of_one_optimizer_in_a_batch_are_two_measured_steps(tmp_path):
    steps = 8
    cb = SMDCallback(log_every_n_steps=1, verbose=False)
    module = TwoStepsPerBatch(steps=steps)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2 * steps, logger=CSVLogger(tmp_path, name="two", version=0),
                         callbacks=[cb], log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module)
    assert trainer.global_step == 2 * steps  # step() calls
    assert set(cb.candidates) == set(NAMES)
    records = list(cb.records)
    for name in NAMES:
        key = f"smd/angular_update/{name}"
        logged = [(step, metrics[key]) for step, metrics in records if key in metrics]
        batches = sorted({step for step, _ in logged})
        assert len(batches) >= 3
        assert len(logged) == 2 * len(batches)  # every measured batch: two records, one per step
        truth = module.angles[name]
        for i, (step, value) in enumerate(logged):
            k = 2 * step + (1 if i > 0 and logged[i - 1][0] == step else 0)  # the k-th step() of the run
            assert value == pytest.approx(truth[k], rel=1e-4), (name, step)
            assert not math.isclose(value, truth[2 * step] + truth[2 * step + 1], rel_tol=0.2)  # not both steps' angle
