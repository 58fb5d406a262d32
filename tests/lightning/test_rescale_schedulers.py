"""Rescale with every kind of scheduler, in both modes, and with EMA weight averaging present."""

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging

from lightning_smd import SMDCallback, theory
from tests.helpers import fit, mean_over, read_metrics
from tests.models import NoisyRayleighQuotient


class LRLog(pl.Callback):
    """The LR each optimizer step used (read at batch start, like LearningRateMonitor)."""

    def __init__(self):
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _drops(lrs, min_drop=2.0):
    return [s for s in range(1, len(lrs)) if lrs[s - 1] / lrs[s] >= min_drop]


class ScheduledNRQ(NoisyRayleighQuotient):
    def __init__(self, make_scheduler, interval, monitor=None, **kw):
        super().__init__(**kw)
        self.make_scheduler, self.interval, self.monitor = make_scheduler, interval, monitor

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("flat", 1.0, on_step=False, on_epoch=True)  # never improves: ReduceLROnPlateau fires
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        config = {"scheduler": self.make_scheduler(opt), "interval": self.interval}
        if self.monitor:
            config["monitor"] = self.monitor
        return {"optimizer": opt, "lr_scheduler": config}


def _warmup_then_drop(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 if s >= 150 else 1.0))


SCHEDULERS = {
    "StepLR per epoch": (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1), "epoch", None),
    "ReduceLROnPlateau": (lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.2, patience=0,
                                                                                   cooldown=10), "epoch", "flat"),
    "warmup then drop": (_warmup_then_drop, "step", None),
    "MultiStepLR per step": (lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [70, 160], 0.1), "step", None),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_rescale_exactly_at_every_drop(tmp_path, name):
    make, interval, monitor = SCHEDULERS[name]
    module = ScheduledNRQ(make, interval, monitor, p=16, sigma=0.5, lr=0.1, weight_decay=0.05, init_norm=2.0)
    lrs = LRLog()
    cb = SMDCallback(log_every_n_steps=10, rescale=True, verbose=False)
    fit(module, tmp_path, [cb, lrs], max_steps=250, limit_train_batches=50)
    drops = _drops(lrs.lrs)
    assert drops, "the schedule has a drop"
    assert [e["step"] for e in cb.rescale_events] == drops  # warmup increases never rescale
    for event in cb.rescale_events:
        old, new = event["lr"]
        assert event["factor"] == pytest.approx(theory.rescale_factor(old, new, 0.05))


@pytest.mark.slow
def test_continuous_mode_follows_a_cosine_schedule(tmp_path):
    """Cosine decay: every step's small change is rescaled, so Δ_t tracks Δ* all the way down."""
    lr, wd, steps = 0.2, 0.05, 600
    results = {}
    for rescale in ("continuous", False):
        module = ScheduledNRQ(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.002),
                              "step", p=64, sigma=1.0, lr=lr, weight_decay=wd,
                              init_norm=(theory.equilibrium_norm_sq_sgd(63, lr, wd)) ** 0.5)
        cb = SMDCallback(log_every_n_steps=1, rescale=rescale, verbose=False)
        m = read_metrics(fit(module, tmp_path / str(rescale), [cb], max_steps=steps))
        ratio = m["smd/angular_update_ratio/mean"]
        results[rescale] = (mean_over(ratio, 300, 450), mean_over(ratio, 500, 599), len(cb.rescale_events))
    (mid, late, events), (_, late_plain, none) = results["continuous"], results[False]
    assert events > 500 and none == 0
    assert mid == pytest.approx(1.0, abs=0.1) and late == pytest.approx(1.0, abs=0.1)
    assert late_plain < 0.6  # without: the norm cannot shrink as fast as the cosine, Δ_t lags


def test_ema_copy_is_rescaled_with_the_weights(tmp_path):
    drop = 100

    class AveragedX(pl.Callback):
        def __init__(self, at_batch_end: bool = False):
            self.at_drop, self.at_batch_end = None, at_batch_end

        def _keep(self, trainer):
            ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMAWeightAveraging))
            self.at_drop = ema._average_model.module.X.detach().clone()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not self.at_batch_end and trainer.global_step == drop:
                self._keep(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.at_batch_end and trainer.global_step == drop + 1:
                self._keep(trainer)

    before, after = AveragedX(), AveragedX(at_batch_end=True)
    module = NoisyRayleighQuotient(p=16, sigma=0.5, lr=0.1, weight_decay=0.05, milestones=[drop], init_norm=2.0)
    smd = SMDCallback(log_every_n_steps=10, rescale=True, verbose=False)
    # the rescale happens in the optimizer's step pre-hook: `before` sees the EMA copy at the batch
    # start, `after` at the batch end, before the EMA's own update (callbacks run in list order)
    fit(module, tmp_path, [after, EMAWeightAveraging(decay=0.99), before, smd], max_steps=drop + 20)
    (event,) = smd.rescale_events
    assert event["step"] == drop and event["averaged_models"] == 1
    torch.testing.assert_close(after.at_drop, before.at_drop * event["factor"])
    assert math.isclose(event["factor"], 10**-0.25)


def test_drop_before_detection_finished_is_deferred_not_skipped(tmp_path):
    """A drop at step 1 (detection runs until step 3): rescaled once detection is done, with the same factor."""
    module = NoisyRayleighQuotient(p=16, sigma=0.5, lr=0.1, weight_decay=0.05, milestones=[1], init_norm=2.0)
    cb = SMDCallback(log_every_n_steps=1, rescale=True, verbose=False)
    with pytest.warns(UserWarning, match="applied as soon as detection finishes"):
        m = read_metrics(fit(module, tmp_path, [cb], max_steps=60))
    (event,) = cb.rescale_events
    assert event["step"] == cb.detect_steps and event["lr"] == [0.1, pytest.approx(0.01)]
    assert event["factor"] == pytest.approx(10**-0.25)
    assert m["smd/rescale_factor"] == {cb.detect_steps: pytest.approx(10**-0.25)}
