"""lightning_smd.core.plan: the LR stages of a fit predicted at fit start, checked against real fits,
the project's Hydra presets and lightning_smd.theory."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.examples_fixtures import CONF_DIR, composed

from examples.modules.optim import ConfiguredOptimizerModule, cosine_with_warmup, warmup_multistep
from hydra.utils import instantiate
from lightning_smd import RescalePolicy, theory
from lightning_smd.lightning.arguments import rescale_policy
from lightning_smd.core.plan import (
    GroupSchedule,
    Plan,
    build_plan,
    plan_from_trainer,
    scheduler_ticks,
    split_stages,
)

#: the presets that run SMD (margin_digits and ewn_vs_swn train homogeneous networks with smd=off)
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")
                     if p.stem not in {"margin_digits", "ewn_vs_swn"})
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
             num_sanity_val_steps=0, accelerator="cpu", devices=1)


# ------------------------------------------------------------------------------- helpers
class _Planned(Exception):
    """Raised at on_train_start once the plan is made: the presets' fits never need a step."""


class PlanAtTrainStart(pl.Callback):
    """What SMDCallback does at fit start: plan, and check the real optimizer was left alone."""

    def __init__(self, stop: bool = True, **kwargs: Any) -> None:
        self.stop, self.kwargs = stop, kwargs
        self.plan: Plan | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        before = _real_state(trainer)
        self.plan = plan_from_trainer(trainer, **self.kwargs)
        assert _real_state(trainer) == before, "planning touched the real optimizer or scheduler"
        if self.stop:
            raise _Planned


def _real_state(trainer: pl.Trainer) -> Any:
    groups = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in trainer.optimizers]
    scheds = [{k: v for k, v in c.scheduler.state_dict().items() if k != "lr_lambdas"}
              for c in trainer.lr_scheduler_configs]
    states = [len(o.state) for o in trainer.optimizers]
    return repr((groups, scheds, states))


class TinyConfigured(ConfiguredOptimizerModule):
    """The examples' optimizer/scheduler plumbing on a 2-tensor BN conv instead of ResNet-50."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).square().mean()


def _loader(batches: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(batches, 1, 2, 2)), batch_size=1)


#: Training-set sizes of the presets' datasets (the data modules read them from disk, absent here).
#: COCO: train2017 images with a usable (non-crowd, non-degenerate) annotation, the count
#: torchvision's and detectron2's loaders report; it only sets the epoch length, the 4x stages are
#: in steps (max_steps, step-interval milestones).
TRAIN_SIZES = {
    "examples.data.ImageNetDataModule": 1_281_167,
    "examples.data.CIFAR10DataModule": 50_000,
    "examples.data.COCODataModule": 117_266,
    "examples.data.DigitsDataModule": 1_797,
}


def preset_batches_per_epoch(cfg: Any) -> int:
    """Batches per epoch on each rank, from the preset's data and trainer config.

    Lightning's DistributedSampler pads the dataset to ``ceil(N / world)`` samples per rank and
    every train_dataloader of examples/data uses ``drop_last=True``.
    """
    target = cfg.data._target_
    if target == "examples.data.StepIndexDataModule":
        return int(cfg.data.steps_per_epoch)  # batch_size 1: one batch per step index
    if target == "examples.data.MarkovSequenceDataModule":  # generated: its size is in the config
        n = int(cfg.data.train_sequences)
        world = int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)
        return math.ceil(n / world) // int(cfg.data.batch_size)  # drop_last=True
    n = TRAIN_SIZES[target]
    if target == "examples.data.DigitsDataModule":
        n -= int(round(cfg.data.val_fraction * n))  # as DigitsDataModule.setup
    world = int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)
    return math.ceil(n / world) // int(cfg.data.batch_size)


_PLANNED: dict[tuple[str, tuple[str, ...]], tuple[Plan, Any, pl.Trainer, float]] = {}


def plan_preset(name: str, tmp_path: Path, overrides: tuple[str, ...] = ()) -> tuple[Plan, Any, pl.Trainer, float]:
    """Compose the preset, build its optimizer/scheduler as examples/train.py does, and plan a
    real Trainer with its max_epochs / max_steps / accumulation and a dataloader of the preset's
    epoch length (on one CPU device). Returns the plan, the config, the trainer and the lr.
    Cached per preset: the preset loop and the Goyal / COCO checks share one composition."""
    key = (name, tuple(overrides))
    if key not in _PLANNED:
        _PLANNED[key] = _plan_preset(name, tmp_path, tuple(overrides))
    return _PLANNED[key]


def _plan_preset(name: str, tmp_path: Path, overrides: tuple[str, ...]) -> tuple[Plan, Any, pl.Trainer, float]:
    with composed([f"experiment={name}", *overrides], tmp_path) as cfg:
        optimizer = instantiate(cfg.optimizer)
        sched = OmegaConf.to_container(cfg.get("scheduler") or {}, resolve=True)
        interval = sched.pop("interval", "epoch")
        scheduler = instantiate(sched) if sched.get("_target_") else None
        module = TinyConfigured(optimizer=optimizer, scheduler=scheduler, scheduler_interval=interval,
                                norm_weight_decay=cfg.model.get("norm_weight_decay"),
                                bias_weight_decay=cfg.model.get("bias_weight_decay"))
        lr = float(cfg.optimizer.lr)
        # the smd preset's rescale: a RescalePolicy node (smd=rescale) or a mode (rescale: true)
        rescale = instantiate(cfg.smd.rescale) if OmegaConf.is_dict(cfg.smd.rescale) else cfg.smd.rescale
        callback = PlanAtTrainStart(rescale=rescale.mode if isinstance(rescale, RescalePolicy) else rescale,
                                    min_drop=(rescale_policy(rescale) or RescalePolicy()).min_drop)
        trainer = pl.Trainer(max_epochs=cfg.trainer.max_epochs, max_steps=cfg.trainer.max_steps,
                             accumulate_grad_batches=cfg.trainer.accumulate_grad_batches, callbacks=[callback],
                             **QUIET)
        batches = preset_batches_per_epoch(cfg)
    with pytest.raises(_Planned):  # PlanAtTrainStart also checks the real optimizer/scheduler state
        trainer.fit(module, _loader(batches))
    return callback.plan, cfg, trainer, lr


def expected_stages(lrs: list[float], bounds: list[int], wd: float, momentum: float) -> list[dict[str, Any]]:
    """The stage numbers computed here from lightning_smd.theory, by hand."""
    out = []
    for i, lr in enumerate(lrs):
        if momentum:
            delta = theory.angular_update_sgdm(lr, wd, momentum)
        else:
            delta = theory.angular_update_sgd(lr, wd)
        needed = (theory.settling_steps(lr, wd, momentum) if i == 0
                  else theory.steps_to_equilibrium(lrs[i - 1], lr, wd, momentum=momentum))
        steps = bounds[i + 1] - bounds[i]
        out.append({"start_step": bounds[i], "end_step": bounds[i + 1], "steps": steps, "lr": lr,
                    "angular_update_theory": delta, "relaxation_steps": theory.relaxation_steps(lr, wd, momentum),
                    "steps_to_equilibrium": needed, "long_enough": steps >= needed,
                    "basis": "init" if i == 0 else "corollary_3.1"})
    return out


def assert_rows_match(plan: Plan, expected: list[dict[str, Any]]) -> None:
    rows = plan.rows()
    assert len(rows) == len(expected), plan.format()
    for row, want in zip(rows, expected):
        for key, value in want.items():
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=1e-12), (key, row)
            else:
                assert row[key] == value, (key, row)


# ----------------------------------------------------------------- every preset of conf/experiment
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_preset_plans_and_prints(tmp_path: Path, name: str) -> None:
    plan, cfg, trainer, lr = plan_preset(name, tmp_path)
    text = plan.format()
    assert text.startswith("SMD plan: optimizer steps 0–")
    assert "columns: steps = optimizer steps" in text and "enough = length ≥ needed" in " ".join(text.split())
    per_epoch = math.ceil(preset_batches_per_epoch(cfg) / cfg.trainer.accumulate_grad_batches)
    ends = [cfg.trainer.max_steps] if cfg.trainer.max_steps != -1 else []
    ends += [per_epoch * cfg.trainer.max_epochs] if cfg.trainer.max_epochs != -1 else []
    assert plan.end_step == min(ends) and plan.steps_per_epoch == per_epoch
    stages = plan.stages
    assert stages and stages[0].start == 0 and stages[-1].end == plan.end_step
    assert all(a.end == b.start for a, b in zip(stages, stages[1:]))
    first = stages[0]
    if "Muon" in cfg.optimizer._target_:
        # groups all/muon (the hidden Linear weights: none in this one-Linear module) and all/adamw (λ = 0)
        assert all(s.group.endswith(("/muon", "/adamw")) for s in stages)
        assert all(s.theory.family == ("muon" if s.group.endswith("/muon") else "none") for s in stages)
        lr = float(cfg.optimizer.adamw_lr) if first.group.endswith("/adamw") else lr
    elif "AdamW" in cfg.optimizer._target_:
        assert first.theory.family == "adamw"
    else:
        assert first.theory.family == ("sgdm" if cfg.optimizer.momentum else "sgd")
    assert first.theory.lr == pytest.approx(lr)
    milestones = list(cfg.scheduler.get("milestones") or []) if cfg.scheduler.get("_target_") else []
    scale = per_epoch if cfg.scheduler.interval == "epoch" else 1
    assert [s.start for s in stages[1:]] == [m * scale for m in milestones if m * scale < plan.end_step]
    assert plan.predictable and plan.elapsed_s < 5.0
    # rows: one per stage, the same keys, usable as a CSV
    rows = plan.rows()
    assert [r["start_step"] for r in rows] == [s.start for s in stages] and len({tuple(r) for r in rows}) == 1
    path = plan.write_csv(tmp_path / "plan.csv")
    with path.open() as f:
        assert [int(r["steps"]) for r in csv.DictReader(f)] == [s.steps for s in stages]
    # advice: too-short stages → rescale recommended, unless the preset rescales already
    if plan.too_short:
        if cfg.smd.rescale:
            assert not plan.recommendations and any("is on" in n for n in plan.notes)
        else:
            assert plan.recommended_rescale is True and plan.recommendations[0].startswith(
                "Recommend rescale=True (Hydra: smd.rescale=true)")
            assert " ".join(plan.recommendations[0].split()) in " ".join(text.replace("\n    ", " ").split())


def test_goyal_imagenet_stages_match_theory(tmp_path: Path) -> None:
    plan, cfg, trainer, lr = plan_preset("imagenet_resnet50_goyal", tmp_path)
    assert lr == pytest.approx(0.1)  # linear scaling: 0.1 × (8 × 32) / 256
    assert plan.steps_per_epoch == math.ceil(1_281_167 / 8) // 32 == 5004  # per rank, drop_last
    bounds = [0, 30 * 5004, 60 * 5004, 80 * 5004, 90 * 5004]
    lrs = [0.1 * 0.1**i for i in range(4)]
    expected = expected_stages(lrs, bounds, 1e-4, 0.9)
    assert_rows_match(plan, expected)
    # the SMD paper: the last two stages never arrive; the second one does
    assert [s.long_enough for s in plan.stages] == [True, True, False, False]
    assert [s.change for s in plan.stages[1:]] == pytest.approx([10.0, 10.0, 10.0])
    assert plan.recommended_rescale is True
    (rec,) = plan.recommendations
    assert "param group 'all'" in rec and "stage 2 (steps 300240–400320, epochs 60–80, η 0.001)" in rec
    assert f"needs {expected[2]['steps_to_equilibrium']}" in rec
    assert not plan.warnings  # the first stage is long enough
    # the real optimizer and scheduler were not stepped
    opt, sched = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and sched.last_epoch == 0 and not opt.state
    # planning is cheap: 90 epochs × 5004 steps, epoch-interval MultiStepLR
    assert plan.elapsed_s < 0.5


@pytest.mark.parametrize("rescale", [False, True])
def test_coco_4x_stages_match_theory(tmp_path: Path, rescale: bool) -> None:
    plan, cfg, trainer, lr = plan_preset("coco_maskrcnn_4x" + ("_rescale" if rescale else ""), tmp_path)
    assert (lr, cfg.trainer.max_steps, list(cfg.scheduler.milestones)) == (0.02, 360_000, [300_000, 340_000])
    bounds = [0, 300_000, 340_000, 360_000]
    lrs = [0.02, 0.002, 0.0002]
    expected = expected_stages(lrs, bounds, 1e-4, 0.9)
    assert_rows_match(plan, expected)
    first = plan.stages[0]
    # the 1000-step linear warm-up joins the first stage (shorter than 1 % of the run)
    assert first.continuous and first.lr_first == pytest.approx(0.02 * 0.001) and first.lr_max == pytest.approx(0.02)
    warm = plan.schedules[0]
    assert warm.steps[:3] == [0, 1, 2] and warm.steps[1000] == 1000 and warm.steps[1001] == 300_000
    assert warm.lr[1000] == pytest.approx(0.02) and len(warm.steps) == 1003  # changes only
    assert [s.long_enough for s in plan.stages] == [True, False, False]
    if rescale:
        assert not plan.recommendations and plan.recommended_rescale is None
        assert any("rescale=True is on" in n for n in plan.notes)
    else:
        (rec,) = plan.recommendations
        assert "stage 1 (steps 300000–340000" in rec and f"needs {expected[1]['steps_to_equilibrium']}" in rec
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.02 * 0.001)  # untouched: warm-up start
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 0
    assert plan.elapsed_s < 5.0  # 360 000 step-interval LambdaLR ticks


def test_quickstart_first_stage_and_cosine_preset_override(tmp_path: Path) -> None:
    plan, cfg, _, _ = plan_preset("quickstart", tmp_path / "a")
    spe = preset_batches_per_epoch(cfg)  # (1797 − 359) // 64 = 22
    assert spe == 22 and plan.end_step == 40 * 22
    assert_rows_match(plan, expected_stages([0.2, 0.02], [0, 10 * 22, 40 * 22], 5e-3, 0.9))
    # the cosine scheduler group (LambdaLR, per step): continuous stages, factor-2 splits
    plan, cfg, _, _ = plan_preset("quickstart", tmp_path / "b",
                                  ("scheduler=cosine", "~scheduler.milestones", "~scheduler.gamma",
                                   "scheduler.interval=step", "scheduler.total_steps=880",
                                   "scheduler.warmup_steps=30"))
    stages = plan.stages
    assert all(s.continuous for s in stages) and len(stages) >= 4
    # the warm-up (30 steps, rising) joins the stage it ramps up to; after it the stages only decay
    assert stages[0].lr_first == pytest.approx(0.2 / 30) and stages[0].end > 30
    assert all(stage.change > 1 for stage in stages[1:])
    body = [s for s in stages[1:] if s.end <= 0.9 * plan.end_step]  # before the tail, where short stages merge
    assert len(body) >= 2 and all(s.lr_first / s.lr_last < 2.0 + 1e-9 for s in body)  # rule 2: within ×2
    assert all(s.steps >= math.ceil(0.01 * plan.end_step) for s in stages)  # rule 3
    assert stages[0].lr_first == pytest.approx(0.2 / 30) and stages[0].lr_max == pytest.approx(0.2)


# --------------------------------------------------------- scheduler kinds vs a real fit's LRs
class LRRecorder(pl.Callback):
    """The (lr, weight_decay, momentum/β1) each real optimizer step used."""

    def __init__(self) -> None:
        self.values: list[tuple[float, float, float | None]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        g = optimizer.param_groups[0]
        mom = g.get("momentum", g["betas"][0] if "betas" in g else None)
        self.values.append((float(g["lr"]), float(g["weight_decay"]), None if mom is None else float(mom)))


class SchedModule(pl.LightningModule):
    def __init__(self, make: Any, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)
        self.make, self.optimizer_kind = make, optimizer

    def factor(self, step: int) -> float:  # a bound method as lr_lambda: must not deep-copy the module
        return 1.0 / (1 + step // 3)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0].flatten(1)[:, :2]).square().mean()

    def configure_optimizers(self):
        if self.optimizer_kind == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.05)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        out = self.make(self, opt)
        return {"optimizer": opt, "lr_scheduler": out} if not isinstance(out, list) else ([opt], out)


def _fit_and_plan(make, *, epochs=3, batches=7, accumulate=1, optimizer="sgd", **plan_kwargs):
    recorder, planner = LRRecorder(), PlanAtTrainStart(stop=False, min_stage_fraction=0.0, **plan_kwargs)
    trainer = pl.Trainer(max_epochs=epochs, accumulate_grad_batches=accumulate, callbacks=[planner, recorder],
                         log_every_n_steps=1, **QUIET)
    trainer.fit(SchedModule(make, optimizer), _loader(batches))
    return planner.plan, recorder.values, trainer


SCHEDULERS = {
    "multistep_step_freq2": lambda m, o: {"scheduler": torch.optim.lr_scheduler.MultiStepLR(o, [2, 4], 0.5),
                                          "interval": "step", "frequency": 2},
    "step_epoch_freq2": lambda m, o: {"scheduler": torch.optim.lr_scheduler.StepLR(o, 1, 0.5), "interval": "epoch",
                                      "frequency": 2},
    "warmup_multistep": lambda m, o: {"scheduler": warmup_multistep(o, [8, 12], 0.1, 5, 0.01), "interval": "step"},
    "cosine_torch": lambda m, o: {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(o, 9, 1e-3),
                                  "interval": "step"},
    "cosine_with_warmup": lambda m, o: {"scheduler": cosine_with_warmup(o, 12, 3), "interval": "step"},
    "onecycle": lambda m, o: {"scheduler": torch.optim.lr_scheduler.OneCycleLR(o, 0.5, total_steps=21),
                              "interval": "step"},
    "lambda_bound_method": lambda m, o: {"scheduler": torch.optim.lr_scheduler.LambdaLR(o, m.factor),
                                         "interval": "step"},
    "lambda_epoch": lambda m, o: {"scheduler": torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.5**e)},
    "sequential_warmup_cosine": lambda m, o: {"scheduler": torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=4),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, 10)], milestones=[4]), "interval": "step"},
    "two_schedulers": lambda m, o: [
        {"scheduler": torch.optim.lr_scheduler.LinearLR(o, 0.2, total_iters=5), "interval": "step"},
        {"scheduler": torch.optim.lr_scheduler.MultiStepLR(o, [1, 2], 0.1), "interval": "epoch"}],
}


@pytest.mark.parametrize("kind,accumulate", [(kind, 1) for kind in sorted(SCHEDULERS)] + [
    (kind, 2) for kind in ("multistep_step_freq2", "step_epoch_freq2", "warmup_multistep")])
def test_planned_lr_equals_the_real_fit(kind: str, accumulate: int) -> None:
    """The plan's η, λ, α at every optimizer step are the ones the real fit then used (7 batches
    per epoch, so with accumulate_grad_batches=2 the last batch of each epoch steps alone)."""
    plan, used, trainer = _fit_and_plan(SCHEDULERS[kind], accumulate=accumulate)
    assert plan.end_step == len(used) == trainer.global_step
    (schedule,) = plan.schedules
    predicted = schedule.values_per_step(plan.end_step)
    assert len(predicted) == len(used)
    for step, (p, u) in enumerate(zip(predicted, used)):
        assert p == pytest.approx(u, rel=1e-12, abs=1e-15), (step, predicted, used)
    assert len(set(used)) > 1  # the schedule did change something
    assert plan.predictable and plan.stages[-1].end == plan.end_step


def test_reduce_on_plateau_is_unpredictable_not_a_crash() -> None:
    def make(m, o):
        return {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0), "monitor": "train_loss"}

    class Logged(SchedModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    planner = PlanAtTrainStart()
    trainer = pl.Trainer(max_epochs=2, callbacks=[planner], **QUIET)
    with pytest.raises(_Planned):
        trainer.fit(Logged(make), _loader(4))
    plan = planner.plan
    assert not plan.predictable and len(plan.stages) == 1 and plan.stages[0].steps == 8
    (warning,) = [w for w in plan.warnings if "ReduceLROnPlateau" in w]
    assert "param group 'pg0'" in warning and "monitor 'train_loss'" in warning and "rescale=True" in warning
    assert "?" in plan.format().splitlines()[2]  # the "enough" column marks it


def test_adamw_relaxation_time_is_decoupled() -> None:
    """AdamW: ‖w‖² relaxes at 2ηλ (docs/optimizer_theory.md §4): τ = 1/(2ηλ), first stage needs 3τ, the
    drops need ⌈ln k/(2η'λ)⌉, and the advice names AdamW's own drop factor k^(-1/2)."""
    plan, _, _ = _fit_and_plan(SCHEDULERS["multistep_step_freq2"], optimizer="adamw")
    stage = plan.stages[0]
    assert stage.theory.family == "adamw"
    assert stage.angular_update == pytest.approx(theory.angular_update_adamw(0.01, 0.05, 0.9))
    assert stage.relaxation_steps == pytest.approx(1 / (2 * 0.01 * 0.05))
    assert stage.needed_steps == 3000 and stage.long_enough is False
    later = [s for s in plan.stages[1:] if s.change is not None]
    assert later and all(s.needed_steps == theory.steps_to_equilibrium_decoupled(
        plan.stages[s.index - 1].theory.lr, s.theory.lr, 0.05) for s in later)
    assert all("k^(-1/4)" not in r for r in plan.recommendations + plan.notes)
    assert any("k^(-1/2)" in r for r in plan.recommendations + plan.notes)


# -------------------------------------------------------------------------------- pure core
class _SGD(torch.optim.SGD):
    pass


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9, weight_decay=1e-4)


def _group() -> dict[str, Any]:
    return {k: v for k, v in _opt().param_groups[0].items() if k != "params"}


def test_split_stages_rules() -> None:
    opt = _opt()
    # a plateau, a 1.5× dip (same stage), a ÷2 (new stage), a rise back (new stage)
    lrs = [0.1] * 50 + [0.07] * 10 + [0.05] * 20 + [0.1] * 20
    sched = GroupSchedule.from_sequence("g", opt, _group(), lrs, 1e-4, 0.9)
    assert sched.steps == [0, 50, 60, 80]
    ranges = split_stages(sched, 100, min_drop=2.0)
    assert [sched.steps[a] for a, _ in ranges] == [0, 60, 80]
    # λ doubling at fixed η moves the equilibrium by k = 2 as well
    sched = GroupSchedule.from_sequence("g", opt, _group(), [0.1] * 100, [1e-4] * 40 + [2e-4] * 60, 0.9)
    assert [sched.steps[a] for a, _ in split_stages(sched, 100)] == [0, 40]
    # a stage shorter than min_stage_steps absorbs the next one; a short last one joins the previous
    sched = GroupSchedule.from_sequence("g", opt, _group(), [1.0] * 3 + [0.1] * 90 + [0.01] * 7, 1e-4, 0.9)
    assert [sched.steps[a] for a, _ in split_stages(sched, 100, min_stage_steps=10)] == [0]
    assert [sched.steps[a] for a, _ in split_stages(sched, 100, min_stage_steps=1)] == [0, 3, 93]
    # a warm-up (rising stages at the start) joins the stage it ramps up to, however long it is
    lrs = [0.001 * 2**i for i in range(7) for _ in range(10)] + [0.1] * 100 + [0.01] * 50
    sched = GroupSchedule.from_sequence("g", opt, _group(), lrs, 1e-4, 0.9)
    assert [sched.steps[a] for a, _ in split_stages(sched, 220, min_stage_steps=1)] == [0, 170]
    plan = build_plan([sched], 220, min_stage_fraction=0.0)
    assert plan.stages[0].theory.lr == 0.1 and plan.stages[0].lr_first == 0.001  # the median: the plateau
    with pytest.raises(ValueError, match="min_drop"):
        split_stages(sched, 100, min_drop=1.0)


def test_build_plan_numbers_and_advice() -> None:
    opt = _opt()
    lrs = [0.1] * 1000 + [0.01] * 300 + [0.001] * 200
    plan = build_plan([GroupSchedule.from_sequence("all", opt, _group(), lrs, 1e-4, 0.9)], 1500)
    assert_rows_match(plan, expected_stages([0.1, 0.01, 0.001], [0, 1000, 1300, 1500], 1e-4, 0.9))
    # 7500 steps needed from the init: the first stage (1000) is too short → a warning, not a rescale advice
    (warning,) = plan.warnings
    assert "param group 'all'" in warning and "first stage" in warning and "~7500" in warning
    assert "rescale does not help" in warning
    (rec,) = plan.recommendations
    assert "Recommend rescale=True" in rec and "stage 1 (steps 1000–1300, η 0.01)" in rec
    # a group without a formula (λ = 0) is listed with the reason
    group = dict(_group(), weight_decay=0.0)
    plan = build_plan([GroupSchedule.from_sequence("norm", opt, group, [0.1] * 10, 0.0, 0.9)], 10)
    assert plan.stages[0].angular_update is None and "weight_decay=0" in plan.warnings[0]
    assert "param group 'norm'" in plan.warnings[0]
    # unpredictable groups are marked
    plan = build_plan([GroupSchedule.from_sequence("pg0", opt, _group(), [0.1] * 10, 1e-4, 0.9)], 10,
                      unpredictable={"pg0": "ReduceLROnPlateau …"})
    assert not plan.stages[0].predictable and "param group 'pg0': ReduceLROnPlateau …" in plan.warnings


def test_scheduler_ticks_mirror_lightning() -> None:
    # 7 batches, accumulate 2 → optimizer steps at batches 1, 3, 5, 6 (the last batch steps too)
    ticks = list(scheduler_ticks("step", 2, 7, 2, end_step=100))
    assert ticks[:4] == [0, 1, 2, 4]  # batch+1 ∈ {2, 4, 6} divisible by 2; batch 6 (7th) is not
    assert list(scheduler_ticks("epoch", 1, 7, 2, end_step=12)) == [3, 7]  # after step 11: nothing left to change
    assert list(scheduler_ticks("epoch", 2, 10, 1, end_step=60)) == [19, 39]
    assert list(scheduler_ticks("step", 1, 5, 1, end_step=6, start_step=3)) == [3, 4]
    assert list(scheduler_ticks("epoch", 1, float("inf"), 1, end_step=10)) == []
    assert list(scheduler_ticks("step", 3, float("inf"), 1, end_step=10)) == [2, 5, 8]
    with pytest.raises(ValueError, match="interval"):
        list(scheduler_ticks("batch", 1, 5, 1, 10))


def test_goyal_step_interval_450k_ticks_is_fast(capsys) -> None:
    """90 epochs × 5004 steps with a per-step MultiStepLR: 450 360 scheduler steps, planned."""

    from pytorch_lightning.core.optimizer import LRSchedulerConfig

    opt = _opt()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [30 * 5004, 60 * 5004, 80 * 5004])
    started = time.perf_counter()
    plan = plan_from_trainer(_FakeTrainer([LRSchedulerConfig(sched, interval="step")], opt, batches=5004,
                                          max_epochs=90))
    elapsed = time.perf_counter() - started
    assert [s.start for s in plan.stages] == [0, 150120, 300240, 400320] and plan.end_step == 450360
    assert opt.param_groups[0]["lr"] == 0.1 and sched.last_epoch == 0
    with capsys.disabled():
        print(f"\n[plan] Goyal schedule at step interval: 450360 ticks planned in {elapsed:.2f} s")
    assert elapsed < 3.0


# --------------------------------------------------------------------------------- W&B table
wandb = pytest.importorskip("wandb")


def test_plan_table_in_offline_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytorch_lightning.loggers import WandbLogger

    from lightning_smd.report import wandb_extras
    from tests.report.test_wandb import history_rows, run_file

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_DIR": str(tmp_path), "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(key, value)

    class LogPlan(PlanAtTrainStart):
        def on_train_start(self, trainer, pl_module) -> None:
            super().on_train_start(trainer, pl_module)
            wandb_extras.log_plan_table(trainer, self.plan.rows(), trainer.global_step)

    planner = LogPlan(stop=False)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="smd-plan-test")
    trainer = pl.Trainer(max_epochs=2, callbacks=[planner], log_every_n_steps=1, **{**QUIET, "logger": logger})
    trainer.fit(SchedModule(SCHEDULERS["warmup_multistep"]), _loader(8))
    wandb.finish()
    wandb.teardown()
    path = run_file(tmp_path)
    (row,) = [r for r in history_rows(path) if f"{wandb_extras.PLAN_TABLE_KEY}._type" in r]
    assert row[f"{wandb_extras.PLAN_TABLE_KEY}._type"] == "table-file" and row["trainer/global_step"] == 0
    table = json.loads((path.parent / "files" / row[f"{wandb_extras.PLAN_TABLE_KEY}.path"]).read_text())
    rows = planner.plan.rows()
    assert table["columns"] == list(rows[0])
    assert [r[table["columns"].index("start_step")] for r in table["data"]] == [r["start_step"] for r in rows]
    got = [r[table["columns"].index("angular_update_theory")] for r in table["data"]]
    assert got == pytest.approx([r["angular_update_theory"] for r in rows])


class _FakeTrainer:
    """The attributes plan_from_trainer reads, for the cases a real fit cannot set up cheaply."""

    def __init__(self, configs, opt, *, batches=5.0, max_steps=-1, max_epochs=2) -> None:
        self.optimizers, self.lr_scheduler_configs = [opt], configs
        self.accumulate_grad_batches, self.max_steps, self.max_epochs = 1, max_steps, max_epochs
        self.num_training_batches, self.global_step, self.lightning_module = batches, 0, None


def test_uncopyable_scheduler_and_unknown_length_do_not_crash() -> None:
    import threading

    from pytorch_lightning.core.optimizer import LRSchedulerConfig

    opt = _opt()
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    sched.lock = threading.Lock()  # deepcopy fails on it
    plan = plan_from_trainer(_FakeTrainer([LRSchedulerConfig(sched, interval="step")], opt))
    assert not plan.predictable and len(plan.stages) == 1 and plan.stages[0].steps == 10
    assert any("could not be copied" in w and "param group 'pg0'" in w for w in plan.warnings)
    assert opt.param_groups[0]["lr"] == 0.1 and sched.last_epoch == 0
    # the epoch length is not known yet (on_fit_start) and there is no max_steps: say so
    plan = plan_from_trainer(_FakeTrainer([], opt, batches=float("inf")))
    assert not plan.stages and "cannot plan" in plan.warnings[0] and "on_train_start" in plan.warnings[0]
    # ... with max_steps the plan needs no epoch length
    plan = plan_from_trainer(_FakeTrainer([], opt, batches=float("inf"), max_steps=40, max_epochs=-1))
    assert plan.end_step == 40 and plan.steps_per_epoch is None and "epochs" not in plan.format().splitlines()[1]


def test_norm_weight_decay_group_is_planned_without_numbers(tmp_path: Path) -> None:
    plan, _, _, _ = plan_preset("quickstart", tmp_path, ("model.norm_weight_decay=0.0",))
    assert plan.groups == ["all", "norm"]
    norm = plan.stages_of("norm")
    assert [s.start for s in norm] == [0, 220] and all(s.angular_update is None for s in norm)
    assert [s.start for s in plan.stages_of("all")] == [0, 220]
    (warning,) = [w for w in plan.warnings if "'norm'" in w]
    assert "weight_decay=0" in warning and "without SMD numbers" in warning


def test_resumed_fit_plans_from_the_restored_step(tmp_path: Path) -> None:
    def make(m, o):
        return {"scheduler": torch.optim.lr_scheduler.MultiStepLR(o, [2], 0.1), "interval": "epoch"}

    first = pl.Trainer(max_epochs=1, **QUIET)
    first.fit(SchedModule(make), _loader(7))
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    recorder, planner = LRRecorder(), PlanAtTrainStart(stop=False)
    trainer = pl.Trainer(max_epochs=3, callbacks=[planner, recorder], **QUIET)
    trainer.fit(SchedModule(make), _loader(7), ckpt_path=tmp_path / "epoch1.ckpt")
    plan = planner.plan
    assert (plan.start_step, plan.end_step) == (7, 21) and any("resumed" in n for n in plan.notes)
    assert [(s.start, s.end) for s in plan.stages] == [(7, 14), (14, 21)]
    predicted = plan.schedules[0].values_per_step(21)
    assert predicted == recorder.values and len(recorder.values) == 14


@pytest.mark.parametrize("kind", ["cyclic", "warm_restarts", "polynomial", "exponential", "chained", "constant",
                                  "multiplicative"])
def test_other_torch_schedulers_match_manual_stepping(kind: str) -> None:
    """No Trainer: the plan of a step-interval scheduler equals stepping the real one after each step."""
    from pytorch_lightning.core.optimizer import LRSchedulerConfig
    from torch.optim import lr_scheduler as lrs

    make = {
        "cyclic": lambda o: lrs.CyclicLR(o, 0.01, 0.1, step_size_up=3),  # cycles the momentum too
        "warm_restarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, 4),
        "polynomial": lambda o: lrs.PolynomialLR(o, 15, 2.0),
        "exponential": lambda o: lrs.ExponentialLR(o, 0.9),
        "chained": lambda o: lrs.ChainedScheduler([lrs.ExponentialLR(o, 0.9), lrs.StepLR(o, 5, 0.5)]),
        "constant": lambda o: lrs.ConstantLR(o, 0.5, total_iters=7),
        "multiplicative": lambda o: lrs.MultiplicativeLR(o, lambda epoch: 0.95),
    }[kind]
    opt = _opt()
    sched = make(opt)
    plan = plan_from_trainer(_FakeTrainer([LRSchedulerConfig(sched, interval="step")], opt, batches=5, max_epochs=4),
                             min_stage_fraction=0.0)
    assert plan.predictable and plan.end_step == 20
    used = []
    for _ in range(20):
        group = opt.param_groups[0]
        used.append((group["lr"], group["weight_decay"], group["momentum"]))
        opt.step()
        sched.step()
    predicted = plan.schedules[0].values_per_step(20)
    assert [p[0] for p in predicted] == pytest.approx([u[0] for u in used], rel=1e-12)
    assert [p[1:] for p in predicted] == [u[1:] for u in used]


def test_groups_without_decay_share_one_warning() -> None:
    """A resnet's no-decay 'norm' and 'bias' groups, over two stages each: one line, naming both (the
    start-up report fits a screen), not one per group."""
    from pytorch_lightning.core.optimizer import LRSchedulerConfig

    params = [nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.SGD([{"params": [params[0]], "weight_decay": 1e-4, "name": "all"},
                           {"params": [params[1]], "weight_decay": 0.0, "name": "norm"},
                           {"params": [params[2]], "weight_decay": 0.0, "name": "bias"}], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5, gamma=0.1)
    plan = plan_from_trainer(_FakeTrainer([LRSchedulerConfig(sched, interval="step")], opt))
    assert len(plan.stages_of("norm")) == len(plan.stages_of("bias")) == 2
    (warning,) = [w for w in plan.warnings if "no equilibrium formula" in w]
    assert "param groups 'norm', 'bias'" in warning and "weight_decay=0" in warning, warning
