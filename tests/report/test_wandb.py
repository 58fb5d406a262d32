"""W&B integration: real fits with an offline ``WandbLogger``, read back from the ``.wandb`` file."""

from __future__ import annotations

import fnmatch
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

from lightning_smd import report
from lightning_smd.report import wandb_extras
from lightning_smd.report.series import RunSeries, read_wandb_records
from tests.report.test_report import (KINDS, ReplayRecords, TinyModule, assert_same_series, short_records, simulate_records,
                         tiny_loader)

wandb = pytest.importorskip("wandb")
from pytorch_lightning.loggers import WandbLogger  # noqa: E402




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
        wandb_extras.log_concern_charts(trainer, series, self.final_step)


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


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
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
        "smd/angular_update_ratio/min", "smd_angular_update/*", "smd_equilibrium/*", "smd_figures/*",
        "smd_rescale/*", "smd_summary/*", "smd_weight_norm/*"]
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
    assert {"exp-smd_angular_update/per_tensor_table._type", "exp-smd_weight_norm/ratio_table._type"} <= keys
    assert {"exp-smd_angular_update/*", "exp-smd_weight_norm/*", "exp-smd_rescale/*", "exp-smd_equilibrium/*"} <= names
    assert_same_series(RunSeries.from_wandb_offline(tmp_path), RunSeries.from_records(replay.logged))


def test_noop_without_wandb_logger(tmp_path: Path, offline_wandb) -> None:
    trainer = pl.Trainer(logger=CSVLogger(tmp_path), accelerator="cpu", max_steps=1)
    wandb_extras.setup(trainer)
    wandb_extras.log_figures(trainer, {"angular_update": tmp_path / "missing.png"}, 3)
    wandb_extras.log_summary_table(trainer, [{"tensor": "a.weight", "ratio": 1.0}], 3)
    wandb_extras.log_concern_charts(trainer, RunSeries.from_records(short_records()), 3)
    assert wandb.run is None
    assert not (tmp_path / "wandb").exists()


def test_noop_on_other_ranks(tmp_path: Path, offline_wandb) -> None:
    logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    trainer = SimpleNamespace(is_global_zero=False, loggers=[logger])
    wandb_extras.setup(trainer)
    wandb_extras.log_summary_table(trainer, [{"tensor": "a.weight", "ratio": 1.0}], 3)
    wandb_extras.log_concern_charts(trainer, RunSeries.from_records(short_records()), 3)
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
@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_end_to_end_smd_callback(tmp_path: Path, offline_wandb, momentum: float) -> None:
    from lightning_smd import EquilibriumOptions, SMDCallback

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


# ------------------------------------------------------- one W&B section per concern
CONCERN_CHARTS = ("smd_angular_update/per_tensor", "smd_angular_update/ratio", "smd_weight_norm/layer",
                  "smd_weight_norm/ratio", "smd_equilibrium/fraction")
CONCERN_TABLES = ("smd_rescale/events", "smd_equilibrium/steps_to_equilibrium")


def lines_of(table: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """A ``line_series`` table (``step, lineKey, lineVal``) as ``{line: [(step, value), ...]}``."""
    assert table["columns"] == ["step", "lineKey", "lineVal"]
    out: dict[str, list[tuple[int, float]]] = {}
    for step, key, value in table["data"]:
        out.setdefault(key, []).append((step, value))
    return out


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_concern_sections_end_to_end(tmp_path: Path, offline_wandb) -> None:
    """A real fit (LR ÷10 at step 40, rescale on): one W&B section per concern, read back."""
    from lightning_smd import EquilibriumOptions, SMDCallback

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 1, 8, 8, generator=g), torch.randint(0, 4, (256,), generator=g)
    # a short window and a wide tolerance so that both LR stages reach "equilibrium" in 80 steps
    callback = SMDCallback(log_every_n_steps=2, rescale=True, equilibrium=EquilibriumOptions(tolerance=0.9, window=4),
                           figures_dir=str(tmp_path / "smd"), verbose=False)
    fit(tmp_path, [callback], module=BNConvNet(),
        loader=DataLoader(TensorDataset(x, y), batch_size=16), max_epochs=5, max_steps=80)
    expected = RunSeries.from_records(callback.records)
    assert [e["step"] for e in callback.rescale_events] == [40]
    path = run_file(tmp_path)
    files = path.parent / "files"
    by_type = records_by_type(path)

    # every chart (its table) and table in one history row at the final step, on the Lightning axis
    keys = [f"{k}_table" for k in CONCERN_CHARTS] + list(CONCERN_TABLES)
    (row,) = [r for r in history_rows(path) if "smd_angular_update/per_tensor_table._type" in r]
    assert row["trainer/global_step"] == 80
    for key in keys:
        assert row[f"{key}._type"] == "table-file", key
        assert (files / row[f"{key}.path"]).is_file(), key
    # one section (first key segment) per concern, none of them the raw ``smd`` section
    sections = {key.split("/")[0] for key in keys}
    assert sections == set(wandb_extras.CONCERN_SECTIONS) == {
        "smd_angular_update", "smd_weight_norm", "smd_rescale", "smd_equilibrium"}
    # the raw contract keys are untouched
    assert "smd/angular_update/model.0.weight" in set().union(*history_rows(path))

    # define_metric: each key falls under a glob of its own section on trainer/global_step
    globs = {m.glob_name: m for m in by_type["metric"] if m.glob_name}
    for key in keys:
        glob = f"{key.split('/')[0]}/*"
        assert fnmatch.fnmatch(key, glob) and globs[glob].step_metric == "trainer/global_step", key
        assert globs[glob].options.step_sync

    # the charts are line-series panels of the run config, each reading its own table
    panels = {}
    for config in by_type["config"]:
        for item in config.update:
            if list(item.nested_key[:2]) == ["_wandb", "visualize"]:
                panels[item.nested_key[2]] = json.loads(item.value_json)
    assert set(panels) == set(CONCERN_CHARTS)
    for key, panel in panels.items():
        assert panel["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
        query = panel["panel_config"]["userQuery"]["queryFields"][0]["fields"][3]
        assert query["args"][0]["value"] == f"{key}_table"

    def table(key: str) -> dict[str, Any]:
        return json.loads((files / row[f"{key}.path"]).read_text())

    # Δ_t per tensor, exactly as logged, and the theory Δ* line dropping by √10 at the LR change
    lines = lines_of(table("smd_angular_update/per_tensor_table"))
    assert set(lines) == {"Δ_t model.0.weight", "Δ_t model.3.weight", "Δ* theory"}
    for name in expected.names:
        steps, values = expected.series("angular_update", name)
        assert lines[f"Δ_t {name}"] == list(zip(steps.tolist(), values.tolist()))
    theory = dict(lines["Δ* theory"])
    steps, values = expected.series("angular_update_theory", "model.0.weight")
    assert theory == {s: v for s, v in zip(steps.tolist(), values.tolist()) if s in theory}
    assert min(theory) == steps[0] and max(theory) == steps[-1]
    levels = sorted(set(theory.values()))
    assert len(levels) == 2 and levels[1] / levels[0] == pytest.approx(10 ** 0.5)
    ratio = lines_of(table("smd_angular_update/ratio_table"))
    assert set(ratio) == {"Δ_t/Δ* mean", "Δ_t/Δ* min", "Δ_t/Δ* max", "equilibrium (1)"}
    assert [v for _, v in ratio["Δ_t/Δ* min"]] == [v for v in expected.ratio_stats["min"] if np.isfinite(v)]

    # weight norms: a representative tensor with its prediction, the ratio for every tensor
    layer = lines_of(table("smd_weight_norm/layer_table"))
    assert set(layer) == {"‖w_t‖ model.0.weight", "predicted ‖w*‖ model.0.weight"}
    # the prediction is piecewise constant between unit-gradient samples: the chart keeps the ends
    # of each constant run (the same line), so every drawn point is a logged one and every level is drawn
    drawn = layer["predicted ‖w*‖ model.0.weight"]
    steps, values = expected.series("weight_norm_theory", "model.0.weight")
    logged = dict(zip(steps.tolist(), values.tolist()))
    assert all(logged[s] == pytest.approx(v) for s, v in drawn)
    assert (drawn[0][0], drawn[-1][0]) == (steps[0], steps[-1])
    assert {round(v, 9) for _, v in drawn} == {round(v, 9) for v in logged.values()}
    norm_ratio = lines_of(table("smd_weight_norm/ratio_table"))
    assert set(norm_ratio) == {f"‖w_t‖/‖w*‖ {n}" for n in expected.names} | {"equilibrium (1)"}

    # rescale and LR change (the callback's records hold no lr-*: no LR factor)
    events = table("smd_rescale/events")
    assert events["columns"] == ["step", "event", "factor"]
    factor = callback.rescale_events[0]["factor"]
    assert events["data"] == [[40, "lr_change", None], [40, "rescale", pytest.approx(factor)]]

    # equilibrium: the fraction over time, and predicted vs measured per LR stage
    fraction = lines_of(table("smd_equilibrium/fraction_table"))["fraction in equilibrium"]
    logged = expected.extra["smd/equilibrium/fraction"]
    assert dict(fraction) == {s: v for s, v in zip(expected.steps.tolist(), logged.tolist()) if s in dict(fraction)}
    assert fraction[-1][1] == 1.0  # both tensors settled in the second stage
    stages = table("smd_equilibrium/steps_to_equilibrium")
    assert stages["columns"] == ["stage_start_step", "group", "rescaled", "predicted_steps", "measured_steps_median",
                                 "measured_steps_min", "measured_steps_max", "tensors_reached"]
    first, second = stages["data"]
    assert first[:4] == [0, "", False, None] and first[-1] == 2
    predicted = expected.extra["smd/steps_to_equilibrium/predicted/pg0"]
    assert second[:4] == [40, "pg0", True, int(round(float(predicted[np.isfinite(predicted)][0])))]
    assert second[-1] == 2
    measured = sorted(s - 40 for s in (expected.equilibrium_step[n] for n in expected.names))
    assert [second[5], second[6]] == [measured[0], measured[-1]]


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_concern_charts_stay_within_the_table_limit() -> None:
    """Many tensors, many steps: at most 100 tensor lines + theory, under wandb.Table.MAX_ROWS,
    and the piecewise-constant Δ* line kept exactly (only its change points)."""
    series = RunSeries.from_records(simulate_records(n_layers=150, dim=8, steps=3000, drop_at=1500, log_every=1))
    specs = wandb_extras._concern_specs(series)
    assert set(specs) >= {"smd_angular_update/per_tensor", "smd_angular_update/ratio", "smd_weight_norm/layer",
                          "smd_weight_norm/ratio", "smd_rescale/events"}
    for key, spec in specs.items():
        if spec["kind"] != "lines":
            continue
        rows = sum(len(x) for x in spec["xs"])
        assert rows <= wandb_extras._MAX_ROWS < wandb.Table.MAX_ROWS, key
        assert all(len(x) <= wandb_extras._MAX_POINTS for x in spec["xs"]), key
    per_tensor = specs["smd_angular_update/per_tensor"]
    assert len(per_tensor["keys"]) == 101 and per_tensor["keys"][-1] == "Δ* theory"
    assert per_tensor["keys"][0] == f"Δ_t {series.names[0]}" and per_tensor["keys"][-2] == f"Δ_t {series.names[-1]}"
    assert "100 of 150 tensors" in per_tensor["title"]
    xs, ys = per_tensor["xs"][-1], per_tensor["ys"][-1]
    assert len(xs) <= 6 and len(set(ys)) == 2  # two LR stages: a step down, drawn exactly
    column = series.angular_update_theory[:, 0]
    for x, y in zip(xs, ys):
        assert column[list(series.steps).index(x)] == y


def test_rescale_table_with_logged_lr() -> None:
    """With ``lr-*`` in the series the LR change carries new/old LR; it is placed at the rescale step."""
    records = [(step, {**m, "lr-SGD": 0.5 if step < 240 else 0.05}) for step, m in short_records()]
    series = RunSeries.from_records(records)
    assert [s for s, _ in series.rescale_events] == [240]
    table = wandb_extras._concern_specs(series)["smd_rescale/events"]
    assert table["data"] == [[240, "lr_change", pytest.approx(0.1)], [240, "rescale", series.rescale_events[0][1]]]
    # nothing to show: no table
    assert "smd_rescale/events" not in wandb_extras._concern_specs(RunSeries.from_records(short_records()[:12]))
