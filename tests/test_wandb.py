"""W&B integration: real fits with an offline ``WandbLogger``, read back from the ``.wandb`` file."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_smd import report, wandb_extras
from lightning_smd.series import RunSeries, read_wandb_records
from test_report import KINDS, ReplayRecords, TinyModule, assert_same_series, short_records, tiny_loader

wandb = pytest.importorskip("wandb")
from pytorch_lightning.loggers import WandbLogger  # noqa: E402


@pytest.fixture
def offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Offline, silent W&B; the environment (WandbLogger sets WANDB_MODE itself) is restored."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_DIR": str(tmp_path), "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(key, value)
    yield
    if wandb.run is not None:
        wandb.finish()


class WandbReplay(ReplayRecords):
    """Replays smd records and drives wandb_extras like SMDCallback would."""

    def __init__(self, records, figures_dir: Path) -> None:
        super().__init__(records)
        self.figures_dir = figures_dir
        self.final_step = -1

    def on_fit_start(self, trainer, pl_module) -> None:
        wandb_extras.setup(trainer)
        wandb_extras.setup(trainer)  # idempotent

    def on_fit_end(self, trainer, pl_module) -> None:
        series = RunSeries.from_records(self.logged)
        self.final_step = trainer.fit_loop.epoch_loop._batches_that_stepped
        figures = report.save_figures(series, self.figures_dir)
        wandb_extras.log_figures(trainer, figures, self.final_step)
        wandb_extras.log_summary_table(trainer, report.summary_rows(series), self.final_step)


def fit(tmp_path: Path, callbacks: list[pl.Callback], prefix: str = "", module=None, loader=None,
        **trainer_kwargs: Any) -> WandbLogger:
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="smd-test", prefix=prefix)
    kwargs = dict(max_epochs=3, accelerator="cpu", log_every_n_steps=1, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(logger=logger, callbacks=callbacks, **kwargs)
    trainer.fit(module or TinyModule(), loader or tiny_loader())
    wandb.finish()
    # finish() can return while wandb-core still writes the end of the .wandb file; teardown()
    # waits for the service, so the file is complete when the test reads it
    wandb.teardown()
    return logger


def run_file(save_dir: Path) -> Path:
    (path,) = save_dir.glob("wandb/offline-run-*/run-*.wandb")
    return path


def records_by_type(path: Path) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        out.setdefault(kind, []).append(getattr(record, kind))
    return out


def history_rows(path: Path) -> list[dict[str, Any]]:
    """History rows as ``{key: value}``, nested media keys joined with ``.``."""
    rows = []
    for history in records_by_type(path)["history"]:
        row = {}
        for item in history.item:
            key = item.key or ".".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def test_offline_run_metrics_figures_table(tmp_path: Path, offline_wandb) -> None:
    replay = WandbReplay(short_records(), tmp_path / "figs")
    fit(tmp_path, [replay])
    path = run_file(tmp_path)
    by_type = records_by_type(path)

    # define_metric records: the smd globs and the ratio keys on the Lightning step, once each
    metrics = by_type["metric"]
    names = [m.name or m.glob_name for m in metrics]
    assert names.count("*") == 1  # WandbLogger's own
    ours = [m for m in metrics if (m.name or m.glob_name).startswith("smd")]
    assert sorted(m.name or m.glob_name for m in ours) == [
        "smd/*", "smd/angular_update_ratio/max", "smd/angular_update_ratio/mean",
        "smd/angular_update_ratio/min", "smd_figures/*", "smd_summary/*"]
    assert all(m.step_metric == "trainer/global_step" and m.options.step_sync for m in ours)
    ratio_min = next(m for m in ours if m.name == "smd/angular_update_ratio/min")
    assert ratio_min.summary.min and ratio_min.summary.max and ratio_min.summary.last
    assert not any(m.HasField("summary") for m in ours if m.glob_name)

    # run summaries: min/max/last for the ratio keys, a plain last value per tensor
    summary: dict[str, Any] = {}
    for record in by_type["summary"]:
        for item in record.update:
            summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    ratios = [m["smd/angular_update_ratio/min"] for _, m in replay.logged]
    ratio_summary = summary["smd/angular_update_ratio/min"]
    assert set(ratio_summary) == {"min", "max", "last"}
    assert ratio_summary == pytest.approx({"min": min(ratios), "max": max(ratios), "last": ratios[-1]})
    last = replay.logged[-1][1]["smd/weight_norm/model.layer0.conv0.weight"]
    assert summary["smd/weight_norm/model.layer0.conv0.weight"] == last  # a plain number

    # images and the table sit on the Lightning step axis
    rows = history_rows(path)
    image_rows = [r for r in rows if "smd_figures/angular_update._type" in r]
    assert len(image_rows) == 1
    image_row = image_rows[0]
    assert image_row["trainer/global_step"] == replay.final_step
    for name in report.FIGURE_FILES:
        assert image_row[f"smd_figures/{name}._type"] == "image-file"
        assert (path.parent / "files" / image_row[f"smd_figures/{name}.path"]).is_file()
    (table_row,) = [r for r in rows if "smd_summary/layers._type" in r]
    assert table_row["smd_summary/layers._type"] == "table-file"
    assert table_row["trainer/global_step"] == replay.final_step
    table = json.loads((path.parent / "files" / table_row["smd_summary/layers.path"]).read_text())
    assert table["columns"] == ["tensor", "angular_update", "angular_update_theory", "ratio", "weight_norm",
                                "weight_norm_theory", "equilibrium_step"]
    assert [row[0] for row in table["data"]] == RunSeries.from_records(replay.logged).names

    # the series come back exactly
    assert_same_series(RunSeries.from_wandb_offline(tmp_path), RunSeries.from_records(replay.logged))
    assert_same_series(RunSeries.from_wandb_offline(path), RunSeries.from_records(replay.logged))
    assert_same_series(RunSeries.from_run_dir(tmp_path), RunSeries.from_records(replay.logged))

    # the report CLI on the offline run directory
    assert report.main([str(path.parent), "--out", str(tmp_path / "report")]) == 0
    for file in [*report.FIGURE_FILES.values(), report.SUMMARY_FILE]:
        assert (tmp_path / "report" / file).is_file(), file


def test_offline_run_with_prefix(tmp_path: Path, offline_wandb) -> None:
    replay = WandbReplay(short_records()[:12], tmp_path / "figs")
    fit(tmp_path, [replay], prefix="exp", max_epochs=1)
    path = run_file(tmp_path)
    names = {m.name or m.glob_name for m in records_by_type(path)["metric"]}
    assert {"exp-smd/*", "exp-smd_figures/*", "exp-smd/angular_update_ratio/max"} <= names
    keys = set().union(*history_rows(path))
    assert "exp-smd/angular_update/model.layer0.conv0.weight" in keys
    assert "exp-smd_figures/angular_update._type" in keys and "exp-smd_summary/layers._type" in keys
    assert_same_series(RunSeries.from_wandb_offline(tmp_path), RunSeries.from_records(replay.logged))


def test_noop_without_wandb_logger(tmp_path: Path, offline_wandb) -> None:
    trainer = pl.Trainer(logger=CSVLogger(tmp_path), accelerator="cpu", max_steps=1)
    wandb_extras.setup(trainer)
    wandb_extras.log_figures(trainer, {"angular_update": tmp_path / "missing.png"}, 3)
    wandb_extras.log_summary_table(trainer, [{"tensor": "a.weight", "ratio": 1.0}], 3)
    assert wandb.run is None
    assert not (tmp_path / "wandb").exists()


def test_noop_on_other_ranks(tmp_path: Path, offline_wandb) -> None:
    logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    trainer = SimpleNamespace(is_global_zero=False, loggers=[logger])
    wandb_extras.setup(trainer)
    wandb_extras.log_summary_table(trainer, [{"tensor": "a.weight", "ratio": 1.0}], 3)
    assert logger._experiment is None and wandb.run is None


def test_wandb_key() -> None:
    assert wandb_extras.wandb_key(WandbLogger(offline=True), "smd/x") == "smd/x"
    assert wandb_extras.wandb_key(WandbLogger(offline=True, prefix="p"), "smd/x") == "p-smd/x"


# ----------------------------------------------------- end to end with SMDCallback
class BNConvNet(pl.LightningModule):
    """Two conv → BN blocks (scale-invariant convs) and a classifier; LR ÷10 at step 40."""

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.model = nn.Sequential(
            nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.2, momentum=self.momentum, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_end_to_end_smd_callback(tmp_path: Path, offline_wandb, momentum: float) -> None:
    from lightning_smd import SMDCallback

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 1, 8, 8, generator=g), torch.randint(0, 4, (256,), generator=g)
    callback = SMDCallback(log_every_n_steps=2, figures_dir=str(tmp_path / "smd"), verbose=False)
    fit(tmp_path, [callback], module=BNConvNet(momentum), loader=DataLoader(TensorDataset(x, y), batch_size=16),
        max_epochs=5, max_steps=80)
    series = RunSeries.from_wandb_offline(tmp_path)
    expected = RunSeries.from_records(callback.records)
    assert series.names == expected.names == ["model.0.weight", "model.3.weight"]
    measured = ~np.isnan(expected.angular_update).all(axis=1)
    assert measured.sum() == 38 and np.isfinite(expected.angular_update[measured]).all()
    # plus the LR change at step 40, where the predicted steps to equilibrium are logged
    assert list(expected.steps[~measured]) == [40]
    assert "smd/steps_to_equilibrium/predicted/pg0" in expected.extra
    at = np.isin(series.steps, expected.steps)  # the callback may log more than its records
    np.testing.assert_array_equal(series.steps[at], expected.steps)
    for kind in KINDS:
        np.testing.assert_array_equal(getattr(series, kind)[at], getattr(expected, kind), err_msg=kind)
    assert report.lr_change_steps(expected) == [39]
    path = run_file(tmp_path)
    rows = history_rows(path)
    keys = set().union(*rows)
    assert "smd/angular_update_theory/model.3.weight" in keys
    for name in report.FIGURE_FILES.values():
        assert (tmp_path / "smd" / name).is_file()
    # the callback itself set up W&B and logged the figures and the per-layer table at fit end
    defined = {m.name or m.glob_name for m in records_by_type(path)["metric"]}
    assert {"smd/*", "smd_figures/*", "smd_summary/*", "smd/angular_update_ratio/min"} <= defined
    (image_row,) = [r for r in rows if "smd_figures/angular_update._type" in r]
    assert image_row["smd_figures/angular_update._type"] == "image-file"
    (table_row,) = [r for r in rows if "smd_summary/layers._type" in r]
    table = json.loads((path.parent / "files" / table_row["smd_summary/layers.path"]).read_text())
    assert [row[0] for row in table["data"]] == ["model.0.weight", "model.3.weight"]
