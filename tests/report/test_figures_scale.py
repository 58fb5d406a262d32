"""Issue 26: figures that read on large models, theory lines at the exact step, fixed colour
scales, the report CLI redrawing every live figure, and a start-up report that fits a screen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from lightning_smd import SMDCallback
from lightning_smd.report import figures as report
from lightning_smd.report.channel_figures import CHANNEL_FIGURE_FILES, HEATMAP_RECORD, plot_bands, select_layers
from lightning_smd.report.series import RunSeries
from lightning_smd.report.summary import MAX_WIDTH
from tests.models import DigitsCNN


def drawn_value(line, step: float) -> float:
    """The value a matplotlib Line2D shows at ``step``, honouring its drawstyle."""
    x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    style = line.get_drawstyle()
    if style == "steps-post":
        return float(y[np.searchsorted(x, step, side="right") - 1])
    if style in ("steps-pre", "steps"):
        return float(y[min(np.searchsorted(x, step, side="left"), len(y) - 1)])
    return float(np.interp(step, x, y))


@pytest.fixture(scope="module")
def drop_run(tmp_path_factory):
    """A real fit logging every 5 steps, LR ÷10 at step 22 (between logged steps 19 and 24), rescale on."""
    tmp = tmp_path_factory.mktemp("drop_run")
    torch.manual_seed(0)
    smd = SMDCallback(log_every_n_steps=5, per_channel=5, rescale=True, verbose=False, figures_dir=str(tmp / "smd"))
    logger = CSVLogger(tmp, name="run")
    trainer = pl.Trainer(max_steps=35, logger=logger, callbacks=[smd], log_every_n_steps=5, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    module = DigitsCNN(lr=0.2, weight_decay=5e-3, milestones=(22,))
    trainer.fit(module)
    return tmp, Path(logger.log_dir), smd


def _lines(path_maker, series, monkeypatch):
    """Render one report figure and return its axes (intercepting the save)."""
    kept = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: kept.setdefault("fig", fig) and path)
    path_maker(series, Path("unused.png"))
    return kept["fig"].axes[0]


def test_theory_line_is_drawn_post_step_at_the_event(monkeypatch):
    """Logged every 5 steps (4, 9, …), LR changes at 14 and 28 (the callback's exact steps_to_equilibrium
    records): the dashed Δ* drops at 14 and 28, not at 9 and 24 (what a pre-step line drew)."""
    records = []
    for step in range(4, 40, 5):
        star = 0.03 if step < 14 else (0.01 if step < 28 else 0.003)
        records.append((step, {"smd/angular_update/a": star * 1.1, "smd/angular_update_theory/a": star}))
    records += [(14, {"smd/steps_to_equilibrium/predicted/pg0": 500.0}),
                (28, {"smd/steps_to_equilibrium/predicted/pg0": 500.0})]
    series = RunSeries.from_records(records)
    assert report.lr_changes(series) == [14, 28]
    ax = _lines(report.plot_angular_update, series, monkeypatch)
    (theory,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert theory.get_drawstyle() == "steps-post"
    assert [drawn_value(theory, s) for s in (9, 13, 14, 24, 27, 28, 39)] == pytest.approx(
        [0.03, 0.03, 0.01, 0.01, 0.01, 0.003, 0.003])


@pytest.mark.slow
def test_theory_lines_change_at_the_step_of_the_lr_change(drop_run, monkeypatch):
    _, log_dir, smd = drop_run
    (event,) = smd.rescale_events
    assert event["step"] == 22
    series = RunSeries.from_csv(log_dir / "metrics.csv")
    at = series.steps.tolist().index(22)  # logged there: the rescale, not a theory value
    assert not np.isfinite(series.angular_update_theory[at]).any()
    ax = _lines(report.plot_angular_update, series, monkeypatch)
    (theory,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    name = series.names[0]
    before = series.angular_update_theory[series.steps.tolist().index(19), 0]
    after = series.angular_update_theory[series.steps.tolist().index(24), 0]
    assert after < before / 2
    assert drawn_value(theory, 21) == pytest.approx(before) and drawn_value(theory, 21.9) == pytest.approx(before)
    assert drawn_value(theory, 22) == pytest.approx(after)
    ax = _lines(lambda s, p: report.plot_weight_norm(s, p, name), series, monkeypatch)
    (norm_theory,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    w_before = series.weight_norm_theory[series.steps.tolist().index(19), 0]
    w_after = series.weight_norm_theory[series.steps.tolist().index(24), 0]
    assert drawn_value(norm_theory, 21.5) == pytest.approx(w_before)
    assert drawn_value(norm_theory, 22) == pytest.approx(w_after)


@pytest.mark.slow
def test_report_cli_redraws_every_live_figure_and_names_its_source(drop_run, capsys):
    tmp, log_dir, _ = drop_run
    live = {p.name for p in (tmp / "smd").glob("*.png")}
    assert set(CHANNEL_FIGURE_FILES.values()) <= live and (tmp / "smd" / HEATMAP_RECORD).is_file()
    assert report.main([str(tmp)]) == 0
    out = capsys.readouterr().out
    assert f"read: CSV (Lightning CSVLogger), {log_dir / 'metrics.csv'}" in out
    redrawn = {p.name for p in (tmp / report.REPORT_DIR).glob("*.png")}
    assert live <= redrawn, live - redrawn


def test_ratio_colour_scales_are_fixed_across_runs(tmp_path, monkeypatch):
    limits = []
    for spread in (0.05, 3.0):  # Δ_t/Δ* within ±5 %, and over three decades
        steps = np.arange(0, 200, 10)
        rng = np.random.default_rng(0)
        records = [(int(s), {**{f"smd/angular_update/t{j}": float(np.exp(rng.normal(0, spread))) * 0.01
                                for j in range(3)},
                             **{f"smd/angular_update_theory/t{j}": 0.01 for j in range(3)}}) for s in steps]
        kept = {}
        monkeypatch.setattr(report, "_save", lambda fig, path: kept.setdefault("fig", fig) and path)
        report.plot_ratio_heatmap(RunSeries.from_records(records), tmp_path / "h.png")
        (mesh,) = kept["fig"].axes[0].collections
        limits.append((mesh.norm.vmin, mesh.norm.vmax, type(mesh.norm).__name__))
        label = kept["fig"].axes[1].get_ylabel()
        assert "fixed 0.1–10" in label and "$\\Delta_t" in label
    assert limits[0] == limits[1] == (0.1, 10.0, "LogNorm")


def test_bands_of_a_large_model_show_a_readable_selection(tmp_path):
    rng = np.random.default_rng(0)
    steps = np.arange(0, 2000, 50)
    names = [f"model.layer{i // 10}.{i % 10}.conv.weight" for i in range(53)]
    off = {n: 1.0 for n in names}
    off.update({names[7]: 8.0, names[30]: 0.05, names[41]: 3.0})
    bands = {n: (steps, {q: off[n] * np.exp(rng.normal(0, 0.05, steps.size)) * (1 + (q - 50) / 100)
                         for q in (5, 25, 50, 75, 95)}) for n in names}
    chosen, how = select_layers(bands)
    assert len(chosen) <= 9 and {names[0], names[26], names[-1], names[7], names[30], names[41]} <= set(chosen)
    assert chosen == [n for n in names if n in chosen] and "of 53 layers" in how
    path = plot_bands(bands, tmp_path / "bands.png")
    from PIL import Image

    width, height = Image.open(path).size
    assert height < 1100 and width < 1600  # was 1408 × 3696 px with 53 panels


def _report_lines(arch: str) -> list[str]:
    import torchvision

    from lightning_smd import theory
    from lightning_smd.core.detect import find_scale_invariant
    from lightning_smd.report.summary import DetectionRow, format_detection_report
    from lightning_smd.core.units import invariance_units

    model = getattr(torchvision.models, arch)(num_classes=10)
    candidates = find_scale_invariant(model, torch.randn(2, 3, 32, 32), detect="structural")
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    group = theory.from_param_group(optimizer, optimizer.param_groups[0])
    rows = [DetectionRow(c.name, tuple(params[c.name].shape), c.reason, "all", group, c.kind) for c in candidates]
    units = invariance_units(model, {c.name: c for c in candidates})
    kwargs = dict(total=len(params), decayed_not_invariant=len(params) - len(rows), units=units)
    grouped = format_detection_report(rows, full=False, full_table_at="SMDCallback(verbose=2), and run/smd/x.txt",
                                      **kwargs)
    full = format_detection_report(rows, **kwargs)
    assert all(c.name in full for c in candidates)
    return grouped.splitlines()


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v2"])
def test_detection_report_of_a_large_model_fits_a_screen(arch):
    lines = _report_lines(arch)
    assert len(lines) <= 20, "\n".join(lines)
    assert max(len(line) for line in lines) <= MAX_WIDTH, "\n".join(lines)
    assert any("layer3" in line or "features." in line for line in lines)


def test_verbose_levels_are_checked():
    SMDCallback(verbose=2)
    SMDCallback(verbose=False)
    with pytest.raises(ValueError, match=r"verbose=\.\.\.\) must be True/False, 0, 1 or 2"):
        SMDCallback(verbose=3)
