"""RunSeries constructors, the SMD figures and tables, and the report CLI.

The data come from simulating the SMD recursion (a noisy Rayleigh quotient per "layer",
SGD with coupled weight decay and an LR drop, the model of SMD_THEORY.md §5) and from real
``pl.Trainer.fit`` runs whose loggers receive records in the ``smd/*`` schema.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_smd.report import figures as report
from lightning_smd.report.series import RunSeries

REPO = Path(__file__).resolve().parents[2]
KINDS = ("angular_update", "angular_update_theory", "weight_norm", "weight_norm_theory", "unit_grad_sq")


# --------------------------------------------------------------- simulation
def simulate_records(
    n_layers: int = 12, dim: int = 24, steps: int = 3000, drop_at: int = 1500, lr: float = 0.5,
    lr_drop: float = 10.0, wd: float = 1e-3, log_every: int = 10, rescale: bool = False, seed: int = 0,
    ema_steps: float = 200.0,
) -> list[tuple[int, dict[str, float]]]:
    """Records in the callback's schema from the exact SMD recursion of noisy Rayleigh quotients.

    Layer i: ``X_i ∈ R^dim``, gradient ``P(A X̃ + σ_i ε)/‖X‖`` (orthogonal to X, scale-invariant),
    ``X ← X − η(g + λX)``; the LR is divided by ``lr_drop`` at ``drop_at`` and, with
    ``rescale``, X is multiplied by ``lr_drop^(-1/4)`` there.
    """
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.0, 1.0, size=(n_layers, dim))
    sigma = np.geomspace(0.3, 3.0, n_layers)[:, None]
    x = rng.normal(size=(n_layers, dim)) * np.geomspace(0.5, 4.0, n_layers)[:, None]
    names = [f"model.layer{i // 2}.conv{i % 2}.weight" for i in range(n_layers)]
    unit_grad_sq, eta, records = None, lr, []
    for t in range(steps):
        if t == drop_at:
            eta = lr / lr_drop
            if rescale:
                x *= lr_drop**-0.25
                records.append((t, {"smd/rescale_factor": lr_drop**-0.25}))
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        u = x / norm
        v = a * u + sigma * rng.normal(size=x.shape)
        v -= (v * u).sum(1, keepdims=True) * u
        g = v / norm
        sample = (np.linalg.norm(g, axis=1) * norm[:, 0]) ** 2
        unit_grad_sq = sample if unit_grad_sq is None else unit_grad_sq + (sample - unit_grad_sq) / ema_steps
        x_new = x - eta * (g + wd * x)
        u_new = x_new / np.linalg.norm(x_new, axis=1, keepdims=True)
        delta = 2 * np.arctan2(np.linalg.norm(u - u_new, axis=1), np.linalg.norm(u + u_new, axis=1))
        x = x_new
        if (t + 1) % log_every:
            continue
        theory = math.sqrt(2 * wd * eta)
        metrics: dict[str, float] = {}
        for i, name in enumerate(names):
            metrics[f"smd/angular_update/{name}"] = float(delta[i])
            metrics[f"smd/angular_update_theory/{name}"] = theory
            metrics[f"smd/weight_norm/{name}"] = float(np.linalg.norm(x[i]))
            metrics[f"smd/weight_norm_theory/{name}"] = float((unit_grad_sq[i] * eta / (2 * wd)) ** 0.25)
            metrics[f"smd/unit_grad_sq/{name}"] = float(unit_grad_sq[i])
        ratio = delta / theory
        metrics["smd/angular_update_ratio/mean"] = float(ratio.mean())
        metrics["smd/angular_update_ratio/min"] = float(ratio.min())
        metrics["smd/angular_update_ratio/max"] = float(ratio.max())
        records.append((t + 1, metrics))
    return records


@pytest.fixture(scope="module")
def drop_series() -> RunSeries:
    return RunSeries.from_records(simulate_records())


@pytest.fixture(scope="module")
def rescaled_series() -> RunSeries:
    return RunSeries.from_records(simulate_records(rescale=True))


def assert_real_png(path: Path, min_colors: int = 20) -> None:
    """The file is a PNG of a sensible size with real content (not blank, many colours)."""
    from matplotlib.image import imread

    assert path.is_file() and path.stat().st_size > 10_000, path
    image = imread(path)
    height, width = image.shape[:2]
    assert 500 <= width <= 2500 and 300 <= height <= 2500, (path, image.shape)
    assert image[..., :3].std() > 0.05, f"{path} looks blank"
    colors = np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) >= min_colors, (path, len(colors))


# ---------------------------------------------------------------- RunSeries
def test_from_records_layout_merge_and_extras() -> None:
    records = [
        (10, {"smd/angular_update/a.weight": 0.01, "smd/weight_norm/a.weight": 2.0, "train_loss": 1.0}),
        (10, {"smd/angular_update/b.weight": 0.02, "lr-SGD": 0.1, "smd/new_thing/a.weight": 7.0}),
        (5, {"pre-smd/angular_update/a.weight": 0.03, "smd/angular_update_ratio/mean": 0.9}),
        (20, {"smd/rescale_factor": 0.5, "smd/equilibrium_step/a.weight": 120.0, "lr-SGD": 0.01}),
        (20, {"smd/unit_grad_sq/b.weight": torch.tensor(3.0), "smd/angular_update/a.weight": "bad"}),
    ]
    s = RunSeries.from_records(records)
    assert s.steps.tolist() == [5, 10, 20] and s.steps.dtype == np.int64
    assert s.names == ["a.weight", "b.weight"]
    for kind in KINDS:
        assert getattr(s, kind).shape == (3, 2)
    np.testing.assert_array_equal(s.angular_update, [[0.03, np.nan], [0.01, 0.02], [np.nan, np.nan]])
    assert s.weight_norm[1, 0] == 2.0 and s.unit_grad_sq[2, 1] == 3.0
    assert s.rescale_events == [(20, 0.5)]
    np.testing.assert_array_equal(s.lr["lr-SGD"], [np.nan, 0.1, 0.01])
    np.testing.assert_array_equal(s.ratio_stats["mean"], [0.9, np.nan, np.nan])
    assert set(s.extra) == {"smd/new_thing/a.weight", "smd/equilibrium_step/a.weight"}
    assert s.equilibrium_step == {"a.weight": 120}
    assert s.series("angular_update", "a.weight")[0].tolist() == [5, 10]


def test_empty_records() -> None:
    s = RunSeries.from_records([])
    assert s.is_empty() and s.names == [] and s.angular_update.shape == (0, 0)
    assert report.summary_rows(s) == []
    assert "No `smd/*`" in report.markdown_summary(s)


def test_simulation_follows_theory(drop_series: RunSeries, rescaled_series: RunSeries) -> None:
    """Sanity of the test data: equilibrium before the drop; after it Δ stays far below Δ*
    without rescale (Corollary 3.1) and is back at Δ* at once with it."""
    before = drop_series.steps <= 1500
    assert 0.85 < np.nanmedian(drop_series.ratio[before][-30:]) < 1.15
    assert np.nanmedian(drop_series.ratio[-30:]) < 0.5
    assert 0.85 < np.nanmedian(rescaled_series.ratio[-30:]) < 1.15
    assert report.lr_change_steps(drop_series) == [1500]


# ------------------------------------------------------------------ figures
@pytest.mark.slow  # over 5 s on 2 cores
def test_figures_from_simulated_lr_drop(tmp_path: Path, rescaled_series: RunSeries) -> None:
    written = report.save_figures(rescaled_series, tmp_path / "figs")
    assert set(written) == set(report.FIGURE_FILES)
    for name, path in written.items():
        assert path == tmp_path / "figs" / report.FIGURE_FILES[name]
        assert_real_png(path)


def test_weight_norm_layer_choice(tmp_path: Path, drop_series: RunSeries) -> None:
    name = drop_series.names[-1]
    written = report.save_figures(drop_series, tmp_path, layer=name)
    assert_real_png(written["weight_norm"])
    with pytest.raises(KeyError, match="unknown tensor"):
        report.save_figures(drop_series, tmp_path, layer="no.such.weight")


def test_figures_skip_missing_data(tmp_path: Path) -> None:
    records = [(s, {"smd/angular_update/a.weight": 0.01 + 0.001 * (s % 3)}) for s in range(1, 40)]
    written = report.save_figures(RunSeries.from_records(records), tmp_path)
    assert set(written) == {"angular_update"}
    assert not (tmp_path / report.FIGURE_FILES["weight_norm"]).exists()
    assert report.save_figures(RunSeries.from_records([]), tmp_path / "empty") == {}


@pytest.mark.slow  # over 5 s on 2 cores
def test_many_tensors_heatmap_thins_labels(tmp_path: Path) -> None:
    series = RunSeries.from_records(simulate_records(n_layers=90, dim=8, steps=400, drop_at=200, log_every=5))
    written = report.save_figures(series, tmp_path)
    assert_real_png(written["ratio_heatmap"])
    assert_real_png(written["angular_update"])


def test_save_figures_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drop_series: RunSeries
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(report, "_warned_no_matplotlib", False)
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert report.save_figures(drop_series, tmp_path) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert report.save_figures(drop_series, tmp_path) == {}  # warned once only
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- tables
def test_summary_rows(drop_series: RunSeries, rescaled_series: RunSeries) -> None:
    rows = report.summary_rows(drop_series, window=20)
    assert [r["tensor"] for r in rows] == drop_series.names
    assert set(rows[0]) == {"tensor", "angular_update", "angular_update_theory", "ratio", "weight_norm",
                            "weight_norm_theory", "equilibrium_step"}
    first = rows[0]
    expected = np.nanmean(drop_series.angular_update[-20:, 0])
    assert first["angular_update"] == pytest.approx(expected)
    assert first["angular_update_theory"] == pytest.approx(math.sqrt(2 * 1e-3 * 0.05))
    assert first["ratio"] == pytest.approx(first["angular_update"] / first["angular_update_theory"])
    assert first["weight_norm"] == drop_series.weight_norm[-1, 0]
    assert first["equilibrium_step"] is None
    assert all(r["ratio"] < 0.5 for r in rows)
    assert all(0.8 < r["ratio"] < 1.25 for r in report.summary_rows(rescaled_series))


def test_summary_fraction_agrees_with_the_window_it_prints() -> None:
    """quickstart_rescale's repro: three tensors at Δ/Δ* 0.964–1.09 over the printed window, while
    the callback's verdict (a stage shorter than equilibrium_window) was 1 of 3: the summary said 33 %."""
    records = []
    for step in range(0, 60, 2):
        metrics = {"smd/equilibrium/fraction": 1 / 3}
        for name, ratio in (("a.weight", 0.964), ("b.weight", 1.0), ("c.weight", 1.09)):
            metrics[f"smd/angular_update/{name}"] = 0.01 * ratio
            metrics[f"smd/angular_update_theory/{name}"] = 0.01
        records.append((step, metrics))
    text = report.markdown_summary(RunSeries.from_records(records))
    assert "within ±0.1 of 1: 3 of 3 (100 %)" in text
    assert "at equilibrium at the end: 33 %" not in text


def test_markdown_summary(rescaled_series: RunSeries) -> None:
    text = report.markdown_summary(rescaled_series)
    assert "**12 scale-invariant tensors**" in text
    assert "Rescale events: step 1500 (×0.5623)" in text
    assert "LR changes at steps (first step with the new rate): 1500." in text
    assert text.count("\n| `model.layer") == 12


# ---------------------------------------------------- real fit, CSV, CLI
class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 20, 0.1),
                                                   "interval": "step"}}


class ReplayRecords(pl.Callback):
    """Logs pre-built ``smd/*`` records through ``trainer.loggers`` the way SMDCallback does
    (``log_metrics(metrics, step=_batches_that_stepped)``), keeping what it logged."""

    def __init__(self, records: list[tuple[int, dict[str, float]]]) -> None:
        self.pending = [m for _, m in records]
        self.logged: list[tuple[int, dict[str, float]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.pending:
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        metrics = self.pending.pop(0)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.logged.append((step, metrics))


def tiny_loader(n: int = 64, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size)


def fit_with_csv(tmp_path: Path, records, prefix: str = "") -> tuple[ReplayRecords, CSVLogger]:
    replay = ReplayRecords(records)
    logger = CSVLogger(tmp_path, name="run", prefix=prefix)
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", logger=logger, log_every_n_steps=1,
        callbacks=[replay, LearningRateMonitor("step")], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(TinyModule(), tiny_loader())
    return replay, logger


def assert_same_series(a: RunSeries, b: RunSeries) -> None:
    np.testing.assert_array_equal(a.steps, b.steps)
    assert a.names == b.names
    for kind in KINDS:
        np.testing.assert_array_equal(getattr(a, kind), getattr(b, kind), err_msg=kind)
    assert a.rescale_events == b.rescale_events
    assert set(a.ratio_stats) == set(b.ratio_stats)
    for key in a.ratio_stats:
        np.testing.assert_array_equal(a.ratio_stats[key], b.ratio_stats[key])


def short_records() -> list[tuple[int, dict[str, float]]]:
    records = simulate_records(n_layers=4, steps=480, drop_at=240, log_every=10, rescale=True)
    merged: dict[int, dict[str, float]] = {}
    for step, metrics in records:  # one record per step, as the callback logs them
        merged.setdefault(step, {}).update(metrics)
    return [(s, merged[s]) for s in sorted(merged)]


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_csv_round_trip_and_cli(tmp_path: Path) -> None:
    replay, logger = fit_with_csv(tmp_path, short_records())
    assert len(replay.logged) == 48
    csv_path = Path(logger.log_dir) / "metrics.csv"
    from_csv = RunSeries.from_csv(csv_path)
    assert_same_series(from_csv, RunSeries.from_records(replay.logged))
    assert from_csv.rescale_events and from_csv.rescale_events[0][1] == pytest.approx(10**-0.25)
    lr = from_csv.lr["lr-SGD"]
    assert np.nanmax(lr) == pytest.approx(0.1) and np.nanmin(lr) == pytest.approx(0.001)
    assert_same_series(RunSeries.from_run_dir(tmp_path), from_csv)

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "lightning_smd.report", str(tmp_path), "--out", str(out),
         "--layer", from_csv.names[1]],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for file in [*report.FIGURE_FILES.values(), report.SUMMARY_FILE]:
        assert (out / file).is_file(), file
        assert f"wrote {out / file}" in done.stdout
    assert_real_png(out / report.FIGURE_FILES["angular_update"])
    assert "4 scale-invariant tensors" in (out / report.SUMMARY_FILE).read_text()


def test_csv_with_logger_prefix(tmp_path: Path) -> None:
    replay, logger = fit_with_csv(tmp_path, short_records()[:10], prefix="exp")
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "exp-smd/angular_update/" in header
    assert_same_series(RunSeries.from_csv(logger.log_dir), RunSeries.from_records(replay.logged))


def test_cli_errors(tmp_path: Path) -> None:
    assert report.main([str(tmp_path)]) == 2
    (tmp_path / "metrics.csv").write_text("step,train_loss\n1,0.5\n")
    assert report.main([str(tmp_path)]) == 2


def test_reorder() -> None:
    records = [(1, {"smd/angular_update/m.10.w": 1.0, "smd/angular_update/m.2.w": 2.0, "smd/weight_norm/m.2.w": 3.0})]
    s = RunSeries.from_records(records)
    assert s.names == ["m.10.w", "m.2.w"]
    r = s.reorder(["m.2.w", "m.10.w"])
    assert r.names == ["m.2.w", "m.10.w"] and r.angular_update.tolist() == [[2.0, 1.0]]
    assert r.weight_norm[0, 0] == 3.0 and np.isnan(r.weight_norm[0, 1])
    with pytest.raises(ValueError):
        s.reorder(["m.2.w"])


# ------------------------------------------- TensorBoard, several runs, output folder
def fit_with(logger, records) -> ReplayRecords:
    replay = ReplayRecords(records)
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", logger=logger, log_every_n_steps=1,
        callbacks=[replay, LearningRateMonitor("step")], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(TinyModule(), tiny_loader())
    return replay


def assert_close_series(a: RunSeries, b: RunSeries) -> None:
    """Equal up to float32 rounding (TensorBoard stores scalars as float32)."""
    np.testing.assert_array_equal(a.steps, b.steps)
    assert a.names == b.names
    for kind in KINDS:
        np.testing.assert_allclose(getattr(a, kind), getattr(b, kind), rtol=1e-6, err_msg=kind)
    assert [s for s, _ in a.rescale_events] == [s for s, _ in b.rescale_events]
    assert set(a.ratio_stats) == set(b.ratio_stats)


def test_tensorboard_event_files_round_trip_and_cli(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    replay = fit_with(logger, short_records())
    assert list(Path(logger.log_dir).glob("events.out.tfevents.*"))
    expected = RunSeries.from_records(replay.logged)
    assert_close_series(RunSeries.from_tensorboard(logger.log_dir), expected)
    from_dir = RunSeries.from_run_dir(tmp_path)
    assert_close_series(from_dir, expected)
    assert from_dir.lr["lr-SGD"][np.isfinite(from_dir.lr["lr-SGD"])].min() == pytest.approx(0.001)

    assert report.main([str(tmp_path)]) == 0
    out = tmp_path / report.REPORT_DIR
    for file in [*report.FIGURE_FILES.values(), report.SUMMARY_FILE]:
        assert (out / file).is_file(), file
    assert "4 scale-invariant tensors" in (out / report.SUMMARY_FILE).read_text()


def test_report_does_not_overwrite_the_callbacks_figures(tmp_path: Path, capsys) -> None:
    _, logger = fit_with_csv(tmp_path, short_records()[:12])
    run = Path(logger.log_dir)
    (run / "smd").mkdir()
    (run / "smd" / report.FIGURE_FILES["angular_update"]).write_bytes(b"callback's figure")
    assert report.main([str(run)]) == 0
    assert (run / "smd" / report.FIGURE_FILES["angular_update"]).read_bytes() == b"callback's figure"
    assert (run / "smd_report" / report.FIGURE_FILES["angular_update"]).stat().st_size > 10_000
    assert f"wrote {run / 'smd_report' / report.SUMMARY_FILE}" in capsys.readouterr().out


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_folder_with_several_runs_is_refused_and_listed(tmp_path: Path, capsys) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_smd.report.series import MultipleRunsError, find_runs

    fit_with_csv(tmp_path, short_records()[:12])  # tmp_path/run/version_0/metrics.csv
    fit_with(TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False), short_records()[:14])
    runs = find_runs(tmp_path)
    assert [(r.root.relative_to(tmp_path).as_posix(), r.kind) for r in runs] == [
        ("run/version_0", "csv"), ("tb/version_0", "tensorboard")]
    with pytest.raises(MultipleRunsError, match="holds 2 runs"):
        RunSeries.from_run_dir(tmp_path)
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "run" / "version_0") in err and str(tmp_path / "tb" / "version_0") in err
    assert "--all" in err
    assert report.main([str(tmp_path), "--all", "--out", str(tmp_path / "reports")]) == 0
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["run_version_0", "tb_version_0"]
    for name in ("run_version_0", "tb_version_0"):
        assert (tmp_path / "reports" / name / report.SUMMARY_FILE).is_file()


def test_hydra_run_dir_with_csv_and_wandb_is_one_run(tmp_path: Path) -> None:
    from lightning_smd.report.series import find_runs

    (tmp_path / ".hydra").mkdir()
    fit_with_csv(tmp_path, short_records()[:12])
    offline = tmp_path / "wandb" / "offline-run-20260101_000000-abc"
    offline.mkdir(parents=True)
    (offline / "run-abc.wandb").write_bytes(b":W&B\xe1\xbe\x00")
    (run,) = find_runs(tmp_path)
    assert run.root == tmp_path and run.kind == "csv"


def test_step_numbers_agree_with_the_callback(tmp_path: Path) -> None:
    """A real SMDCallback run with an LR drop: the summary names the step the callback logged."""
    from lightning_smd import SMDCallback

    callback = SMDCallback(log_every_n_steps=5, rescale=True, verbose=False, figures_dir=str(tmp_path / "smd"))
    logger = CSVLogger(tmp_path, name="run")
    trainer = pl.Trainer(max_steps=30, accelerator="cpu", logger=logger, log_every_n_steps=5,
                         callbacks=[callback, LearningRateMonitor("step")], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyModule(), tiny_loader(n=128))  # StepLR: lr ÷10 after 20 steps
    (event,) = callback.rescale_events
    assert event["step"] == 20
    series = RunSeries.from_csv(Path(logger.log_dir) / "metrics.csv")
    assert report.lr_changes(series) == [20] and report.lr_change_steps(series) == [19]
    text = report.markdown_summary(series)
    assert "LR changes at steps (first step with the new rate): 20." in text
    assert "Rescale events: step 20" in text
    stages = callback.equilibrium.stages
    assert [s.start_step for s in stages][-1] == 20


def test_summary_tables_explain_their_columns(rescaled_series: RunSeries) -> None:
    from lightning_smd.core.equilibrium import EquilibriumTracker

    text = report.markdown_summary(rescaled_series)
    legend = next(line for line in text.splitlines() if line.startswith("Columns:"))
    header = next(line for line in text.splitlines() if line.startswith("| tensor"))
    for column in [c.strip() for c in header.strip("|").split("|")][1:]:
        assert f"**{column.split(' [')[0]}**" in legend, column
    tracker = EquilibriumTracker(tolerance=0.1, window=10)
    tracker.start_stage("all", 199, 120, True, ["w"])
    for step in range(199, 230):
        tracker.update(step, ["all"], ["w"], [1.0])
    summary = tracker.summary().splitlines()
    assert "reached at" in summary[1] and "tensors: how many reached it" in summary[1]
    assert summary[2].split() == ["group", "from", "step", "rescaled", "predicted", "reached", "at", "(median)",
                                  "tensors"]
    assert summary[3].split() == ["all", "199", "True", "120", "199", "(+0)", "1"]  # inside from its first step
