"""The runs users really have: no-gradient steps, NaNs, duplicate callbacks, resumes with other
arguments, LR schedules through zero, models with nothing to measure, and early failures."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_smd import DetectionOptions, EstimateOptions, SMDCallback, theory
from lightning_smd.core.measure import GroupSlice, StepMeasurer, angular_update
from tests.helpers import fit, read_metrics
from tests.models import NoisyRayleighQuotient


def _data(n=512, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


class TwoBranches(pl.LightningModule):
    """``a → BN`` on every step, ``b → BN`` only on even steps (a branch used on some steps only)."""

    def __init__(self, optimizer="sgdm"):
        super().__init__()
        self.a, self.bn_a = nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16)
        self.b, self.bn_b = nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 2)
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.bn_a(self.a(x))
        if self.global_step % 2 == 0:
            h = h + self.bn_b(self.b(x))
        return nn.functional.cross_entropy(self.head(torch.relu(h)), y)

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.05)
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=5e-3)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)

    def train_dataloader(self):
        return _data()


class TrueAngles(pl.Callback):
    """Brute force: the angle each step really turned ``b.weight`` by, from copies of w_t and w_{t+1}."""

    def __init__(self):
        self.before, self.angles, self.norms = None, {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = pl_module.b.weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.angles[step] = float(angular_update(self.before.double(), pl_module.b.weight.detach().double()))
        self.norms[step] = float(self.before.norm())


@pytest.mark.parametrize("optimizer", ["sgdm", "sgd", "adamw"])
def test_step_without_gradient_reads_what_happened(tmp_path, optimizer):
    truth = TrueAngles()
    smd = SMDCallback(log_every_n_steps=1, verbose=False, estimates=EstimateOptions(unit_grad_every=1))
    trainer = fit(TwoBranches(optimizer), tmp_path, [truth, smd], max_steps=12)
    m = read_metrics(trainer)
    logged = m["smd/angular_update/b.weight"]
    assert set(logged) == set(range(4, 12))  # detection decides in step 3
    for step, delta in logged.items():
        if step % 2:  # no gradient reached b: the optimizer skipped it, it did not move
            assert truth.angles[step] == 0.0
            assert delta == 0.0
        else:
            assert delta == pytest.approx(truth.angles[step], rel=1e-4)
        assert m["smd/weight_norm/b.weight"][step] == pytest.approx(truth.norms[step], rel=1e-5)


def test_unit_gradient_is_not_sampled_for_a_tensor_without_gradient():
    w = nn.Parameter(torch.randn(4, 3))
    v = nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.SGD([w, v], lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(2):  # both get momentum buffers
        opt.zero_grad()
        (w.sum() ** 2 + v.sum() ** 2).backward()
        opt.step()
    opt.zero_grad()
    (w.sum() ** 2).backward()  # v gets no gradient this step
    measurer = StepMeasurer([GroupSlice(opt, 0, [w, v], 0, "buffer")])
    measurer.before_step(opt, unit_grad=True)
    v_before = v.detach().clone()
    opt.step()
    stats, _ = measurer.after_step()
    torch.testing.assert_close(v.detach(), v_before)  # torch's SGD skipped v
    assert stats[0, 1].item() == 0.0  # Δ = 0, not the stale momentum's angle
    assert stats[1, 1].item() == pytest.approx(float(v_before.norm()), rel=1e-6)
    assert math.isnan(stats[2, 1].item())  # no unit-gradient sample (not a zero one)
    assert math.isfinite(stats[2, 0].item()) and stats[2, 0].item() > 0


class TurnsNaN(pl.LightningModule):
    """A BN MLP whose loss turns NaN from step ``at`` on (no GradScaler to catch it)."""

    def __init__(self, at=12):
        super().__init__()
        self.a, self.bn = nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 2)
        self.at = at

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(torch.relu(self.bn(self.a(x)))), y)
        return loss * math.nan if self.global_step >= self.at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)

    def train_dataloader(self):
        return _data()


def test_nan_steps_warn_once_and_do_not_log_stale_theory(tmp_path):
    smd = SMDCallback(log_every_n_steps=1, verbose=False, estimates=EstimateOptions(unit_grad_every=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(TurnsNaN(at=12), tmp_path, [smd], max_steps=20)
    nan_warnings = [w for w in caught if "not finite" in str(w.message)]
    assert len(nan_warnings) == 1
    assert "step 12" in str(nan_warnings[0].message) and "a.weight" in str(nan_warnings[0].message)
    m = read_metrics(trainer)
    assert all(math.isnan(m["smd/angular_update/a.weight"][s]) for s in range(12, 20))
    assert max(m["smd/unit_grad_sq/a.weight"]) < 12  # no stale running L after the NaN
    assert max(m["smd/weight_norm_theory/a.weight"]) < 12
    assert all(math.isfinite(v) for v in m["smd/unit_grad_sq/a.weight"].values())
    assert math.isfinite(smd.unit_grad.get("a.weight"))  # the running estimate is not contaminated


def test_a_second_smd_callback_is_refused_before_training(tmp_path):
    module = NoisyRayleighQuotient(p=8)
    # given to the Trainer: its state key is the class, and Lightning refuses duplicates when the Trainer is built
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `SMDCallback`"):
        fit(module, tmp_path, [SMDCallback(verbose=False), SMDCallback(rescale=True, verbose=False)], max_steps=5)
    # added later (or a subclass, with another state key): refused at setup, before the first step
    trainer = pl.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[SMDCallback(verbose=False)])
    trainer.callbacks.append(type("MySMD", (SMDCallback,), {})(rescale=True, verbose=False))
    with pytest.raises(ValueError, match="two SMDCallback"):
        trainer.fit(module)
    assert module.risks == []


@pytest.mark.slow  # over 7 s on 2 cores
@pytest.mark.parametrize("resume_at", [300, 320])  # checkpoint with the new LR but before the rescale / after it
def test_resume_with_other_arguments_neither_skips_nor_repeats_a_rescale(tmp_path, resume_at):
    drop, total = 300, 400
    kw = dict(p=16, sigma=0.5, lr=0.1, weight_decay=0.05, milestones=[drop], gamma=0.1, init_norm=2.0)
    straight = NoisyRayleighQuotient(**kw)
    fit(straight, tmp_path / "straight", [SMDCallback(log_every_n_steps=10, rescale=True, verbose=False)],
        max_steps=total)

    first = NoisyRayleighQuotient(**kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=resume_at, save_top_k=-1)
    cb1 = SMDCallback(log_every_n_steps=10, rescale=True, verbose=False)
    fit(first, tmp_path / "first", [cb1, ckpt], max_steps=resume_at, enable_checkpointing=True)
    path = tmp_path / "ckpt" / f"epoch=0-step={resume_at}.ckpt"

    resumed = NoisyRayleighQuotient(**kw)
    cb2 = SMDCallback(log_every_n_steps=5, rescale=True, verbose=False, detection=DetectionOptions(mode="structural"))
    with pytest.warns(UserWarning, match="log_every_n_steps"):
        fit(resumed, tmp_path / "resumed", [cb2], max_steps=total, ckpt_path=str(path))
    assert [e["step"] for e in cb2.rescale_events] == [drop]  # exactly once, at the drop
    torch.testing.assert_close(resumed.X.detach(), straight.X.detach())
    assert cb2.candidates.keys() == {"X"}  # restored, not re-detected (structural would find nothing)


def _lambda_module(factors: dict[int, float], **kw):
    """NRQ whose LR is 0.1 × the factor of the last key ≤ step (a LambdaLR, step interval)."""

    class Scheduled(NoisyRayleighQuotient):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=self.weight_decay)
            keys = sorted(factors)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: factors[max(k for k in keys if k <= step)])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Scheduled(p=16, sigma=0.5, weight_decay=0.05, init_norm=2.0, **kw)


def test_lr_through_zero_rescales_against_the_last_nonzero_lr(tmp_path):
    cb = SMDCallback(log_every_n_steps=5, rescale=True, verbose=False)
    with pytest.warns(UserWarning, match="no equilibrium"):
        fit(_lambda_module({0: 1.0, 20: 0.0, 30: 0.1}), tmp_path, [cb], max_steps=50)
    (event,) = cb.rescale_events
    assert event["step"] == 30 and event["lr"] == pytest.approx([0.1, 0.01])
    assert event["factor"] == pytest.approx(theory.rescale_factor(0.1, 0.01, 0.05))


def test_warm_restart_through_zero_is_an_increase_and_a_later_drop_still_counts(tmp_path):
    cb = SMDCallback(log_every_n_steps=5, rescale=True, verbose=False)
    fit(_lambda_module({0: 1.0, 10: 0.1, 20: 0.0, 25: 1.0, 35: 0.0, 40: 0.01}), tmp_path, [cb], max_steps=50)
    # 0.1 → 0.01 at 10 (drop); 0.01 → 0 → 0.1 at 25 (increase: no rescale by default); 0.1 → 0 → 0.001 at 40
    assert [(e["step"], *e["lr"]) for e in cb.rescale_events] == [
        (10, pytest.approx(0.1), pytest.approx(0.01)), (40, pytest.approx(0.1), pytest.approx(0.001))]
    assert cb.rescale_events[1]["factor"] == pytest.approx(theory.rescale_factor(0.1, 0.001, 0.05))


class PlainMLP(pl.LightningModule):
    """Nothing scale-invariant: no normalization anywhere."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)

    def train_dataloader(self):
        return _data()


def test_nothing_scale_invariant_decides_once_then_costs_nothing(tmp_path, monkeypatch):
    import lightning_smd.core.engine as callback  # the engine prints the reports
    from lightning_smd.core import detect

    reports, updates = [], []
    monkeypatch.setattr(callback, "rank_zero_info", lambda msg, *a, **k: reports.append(msg))
    original = detect.RadialCosineCheck.update
    monkeypatch.setattr(detect.RadialCosineCheck, "update", lambda self: updates.append(1) or original(self))
    cb = SMDCallback(log_every_n_steps=1, detection=DetectionOptions(steps=3))
    trainer = fit(PlainMLP(), tmp_path, [cb], max_steps=60)
    assert len(reports) == 1 and "nothing to measure" in reports[0], reports  # said once, no plan after it
    assert len(updates) == 3  # the detection window, then no tensor work
    assert cb._measurer is None and cb.candidates == {}
    metrics_csv = Path(trainer.logger.log_dir) / "metrics.csv"
    assert not metrics_csv.exists() or not any(k.startswith("smd/") for k in read_metrics(trainer))


def test_unwritable_figures_dir_fails_at_setup(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    module = NoisyRayleighQuotient(p=8)
    with pytest.raises(ValueError, match="figures_dir"):
        fit(module, tmp_path, [SMDCallback(figures_dir=str(blocker / "smd"), verbose=False)], max_steps=5)
    assert module.risks == []


def test_a_raising_filter_names_the_parameter_before_the_first_step(tmp_path):
    def include(name):
        if name == "X":
            raise KeyError("boom")
        return True

    module = NoisyRayleighQuotient(p=8)
    with pytest.raises(ValueError, match=r"include.*'X'.*boom"):
        fit(module, tmp_path, [SMDCallback(include=include, verbose=False)], max_steps=5)
    assert module.risks == []


def test_a_rescale_still_pending_at_the_end_is_reported(tmp_path):
    # the LR drops after the last step: the rescale would be applied before a next step that never comes
    module = NoisyRayleighQuotient(p=8, milestones=[10], gamma=0.1)
    with pytest.warns(UserWarning, match="pending when training ended"):
        fit(module, tmp_path, [SMDCallback(rescale=True, verbose=False)], max_steps=10)
