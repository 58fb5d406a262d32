"""Weights & Biases extras for ``SMDCallback``: metric definitions, figures, a per-tensor table.

Every function acts on the ``pytorch_lightning.loggers.WandbLogger`` instances among
``trainer.loggers``, on global rank 0 only, and does nothing when there are none (``wandb`` is
then never imported).

What W&B does with the ``smd/*`` keys (read from wandb 0.31 and its ``wandb-core`` service):

* ``WandbLogger`` defines ``trainer/global_step`` and the glob ``*`` (``step_metric=
  "trainer/global_step"``, ``step_sync=True``) when it creates the run, and its
  ``log_metrics`` adds ``trainer/global_step`` and joins a ``prefix`` with ``-``. So every
  ``smd/*`` series is already plotted against the Lightning step.
* A second glob such as ``smd/*`` cannot carry per-key settings reliably: wandb-core matches
  a new key against its globs in Go map order (random), so ``*`` wins for a random subset of
  keys. Summaries are therefore set with exact ``define_metric`` names; the ``smd/*`` glob
  here only repeats the step metric (same result whichever glob wins).
* In an exact name, an unescaped ``.`` is read as nesting when the summary is configured, so
  a parameter name like ``model.conv1.weight`` must be written ``model\\.conv1\\.weight``.
* The workspace groups panels into sections by the key's first ``/`` segment by default
  (all of ``smd/*`` in one section ``smd``), or, with the workspace setting that groups by
  all segments, by everything before the last ``/`` (``smd/angular_update``,
  ``smd/weight_norm``, …). ``define_metric`` has no say in sections, and the ``smd/*`` keys
  are a contract (dashboards depend on them), so they stay as they are.

The sections a user gets without configuring anything, one per first key segment:

* ``smd``: every raw series of the metric schema (``smd/angular_update/{name}``, …);
* ``smd_angular_update``: :func:`log_concern_charts`' ``per_tensor`` chart (Δ_t of every tensor
  with the theory Δ* line, the paper's Fig. 3) and ``ratio`` (Δ_t/Δ* mean/min/max);
* ``smd_weight_norm``: ``layer`` (‖w_t‖ vs predicted ‖w*‖ of a representative tensor) and
  ``ratio`` (‖w_t‖/‖w*‖ of every tensor, 1 at equilibrium);
* ``smd_rescale``: the ``events`` table (rescales and LR changes), when there are any;
* ``smd_equilibrium``: ``fraction`` (share of tensors in equilibrium over time) and the
  ``steps_to_equilibrium`` table (predicted vs measured, per LR stage);
* ``smd_figures``: the matplotlib figures; ``smd_summary``: the end-of-run per-tensor table.

The charts are ``wandb.plot.line_series`` custom charts: W&B stores each one's data as a table
under ``{key}_table`` (``_type`` ``table-file``) and its Vega panel in the run config under
``_wandb.visualize.{key}``. A ``wandb.Table`` holds at most ``wandb.Table.MAX_ROWS`` (10 000)
rows and is truncated beyond, so each chart draws at most ``_MAX_TENSOR_LINES`` tensors (evenly
spaced, input → output) and at most ``_MAX_POINTS`` points per line, ``_MAX_ROWS`` in all.
The tables (``{key}_table``, ``events``, ``steps_to_equilibrium``) are ordinary history media
under their concern's prefix; where the web UI draws the Vega panels themselves (their key's
section, or a custom-charts section) is the UI's choice and cannot be checked offline.
"""

from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from lightning_smd.report.loggers import loggers_of_kind

if TYPE_CHECKING:
    from lightning_smd.report.series import RunSeries

__all__ = ["log_concern_charts", "log_figures", "log_plan_table", "log_summary_table", "log_to_wandb", "setup", "wandb_key",
           "wandb_loggers"]

FIGURES_SECTION = "smd_figures"
TABLE_KEY = "smd_summary/layers"
PLAN_TABLE_KEY = "smd_equilibrium/plan"  # next to the measured steps_to_equilibrium table
_STEP_METRIC = "trainer/global_step"
_RATIO_KEYS = ("smd/angular_update_ratio/mean", "smd/angular_update_ratio/min", "smd/angular_update_ratio/max")
#: One W&B section (first key segment) per concern, filled by :func:`log_concern_charts`.
CONCERN_SECTIONS = ("smd_angular_update", "smd_weight_norm", "smd_rescale", "smd_equilibrium")
_GLOBS = ("smd/*", f"{FIGURES_SECTION}/*", "smd_summary/*", *(f"{section}/*" for section in CONCERN_SECTIONS))
_MAX_TENSOR_LINES = 100  # tensors drawn per chart (evenly spaced, input → output)
_MAX_THEORY_LINES = 8  # distinct Δ* lines drawn (one per LR/weight-decay group, usually 1)
_MAX_POINTS = 1000  # points per line
_MAX_ROWS = 9000  # points per chart, below wandb.Table.MAX_ROWS (10 000) where it truncates
_MIN_POINTS = 10
# run object -> metric names already defined on it (a resumed run is a new object: redefined)
_defined: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def wandb_loggers(trainer: Any) -> list[Any]:
    """The trainer's ``WandbLogger`` instances, on global rank 0 only."""
    return loggers_of_kind(trainer, "WandbLogger")


def wandb_key(logger: Any, key: str) -> str:
    """The key W&B sees for ``key`` logged through ``logger`` (its prefix joined with ``-``)."""
    prefix = getattr(logger, "_prefix", "")
    return f"{prefix}{logger.LOGGER_JOIN_CHAR}{key}" if prefix else key


def _escape(name: str) -> str:
    """Exact metric names: an unescaped ``.`` would be read as nesting by the run summary."""
    return name.replace(".", "\\.")


def _step_metric(logger: Any) -> str:
    # WandbLogger logs no trainer/global_step under sync_tensorboard; mirror its own choice
    init = getattr(logger, "_wandb_init", {}) or {}
    return "global_step" if init.get("sync_tensorboard") else _STEP_METRIC


def _define(logger: Any, name: str, **kwargs: Any) -> None:
    run = logger.experiment
    if not callable(getattr(run, "define_metric", None)):
        return
    seen = _defined.setdefault(run, set())
    if name in seen:
        return
    run.define_metric(name, **kwargs)
    seen.add(name)


def setup(trainer: Any) -> None:
    """Define the ``smd/*`` metrics in every ``WandbLogger`` of ``trainer`` (rank 0).

    * ``trainer/global_step`` is the x-axis of ``smd/*``, ``smd_figures/*``, ``smd_summary/*``
      and the concern sections ``smd_angular_update/*``, ``smd_weight_norm/*``,
      ``smd_rescale/*``, ``smd_equilibrium/*`` (prefix respected). ``WandbLogger`` already does so for ``*`` when it
      creates the run; these globs matter when it attached to an existing run.
    * ``smd/angular_update_ratio/{mean,min,max}`` keep ``min``, ``max`` and ``last`` in the run
      summary. Every other series keeps W&B's default summary, its last value (an explicit
      ``summary="last"`` would turn it into a ``{"last": v}`` dict in the runs table).

    Idempotent; call it again after a resume.
    """
    for logger in wandb_loggers(trainer):
        step = _step_metric(logger)
        _define(logger, step)
        for glob in _GLOBS:
            _define(logger, wandb_key(logger, glob), step_metric=step, step_sync=True)
        for key in _RATIO_KEYS:
            _define(logger, _escape(wandb_key(logger, key)), step_metric=step, step_sync=True,
                    summary="min,max,last")


def log_to_wandb(trainer: Any, make: Any, step: int) -> None:
    """``logger.log_metrics(make(logger), step)`` on each WandbLogger: adds the logger prefix
    and ``trainer/global_step`` so media land on the Lightning step axis."""
    for logger in wandb_loggers(trainer):
        payload = make()
        if payload:
            logger.log_metrics(payload, step=int(step))


def log_figures(trainer: Any, figures: Mapping[str, Path], step: int) -> None:
    """Log each figure file as a ``wandb.Image`` under ``smd_figures/{name}`` at ``step``."""
    if not figures or not wandb_loggers(trainer):
        return
    import wandb

    log_to_wandb(trainer, lambda: {f"{FIGURES_SECTION}/{name}": wandb.Image(str(path)) for name, path in figures.items()
                           if Path(path).is_file()}, step)


def _log_table(trainer: Any, key: str, rows: list[dict[str, Any]], step: int) -> None:
    """``rows`` (dicts with the same keys) as one ``wandb.Table`` under ``key`` at ``step``."""
    if not rows or not wandb_loggers(trainer):
        return
    import wandb

    columns = list(rows[0])

    def make() -> dict[str, Any]:
        data = [[row.get(col) for col in columns] for row in rows]
        return {key: wandb.Table(columns=columns, data=data)}

    log_to_wandb(trainer, make, step)


def log_summary_table(trainer: Any, rows: list[dict[str, Any]], step: int) -> None:
    """Log ``rows`` (:func:`lightning_smd.report.summary_rows`) as a ``wandb.Table`` under
    ``smd_summary/layers`` at ``step``."""
    _log_table(trainer, TABLE_KEY, rows, step)


def log_plan_table(trainer: Any, rows: list[dict[str, Any]], step: int) -> None:
    """Log ``rows`` (:meth:`lightning_smd.core.plan.Plan.rows`, one per predicted LR stage and group) as a
    ``wandb.Table`` under ``smd_equilibrium/plan`` at ``step`` (the fit's first step): the
    prediction that ``smd_equilibrium/steps_to_equilibrium`` measures. Rank 0; nothing without a
    ``WandbLogger``."""
    _log_table(trainer, PLAN_TABLE_KEY, rows, step)


# ------------------------------------------------------------ concern charts
def log_concern_charts(trainer: Any, series: RunSeries, step: int) -> None:
    """Log custom charts and tables built from ``series`` at ``step``, one W&B section per concern.

    Keys (each chart's data lands in history under ``{key}_table``):

    * ``smd_angular_update/per_tensor``: Δ_t of every tensor with the theory Δ* line(s);
      ``smd_angular_update/ratio``: Δ_t/Δ* mean, min and max, with the equilibrium value 1;
    * ``smd_weight_norm/layer``: ‖w_t‖ and predicted ‖w*‖ of the tensor with the most data;
      ``smd_weight_norm/ratio``: ‖w_t‖/‖w*‖ of every tensor, with the equilibrium value 1;
    * ``smd_rescale/events``: table ``step, event, factor`` of the rescales (``factor``: what
      the weights were multiplied by) and LR changes (``factor``: new/old LR when ``lr-*`` is
      logged, else empty; ``step``: the step the callback saw the new rate at, else the first
      logged step with it); only when there are any;
    * ``smd_equilibrium/fraction``: share of tensors in equilibrium over time;
      ``smd_equilibrium/steps_to_equilibrium``: table, one row per LR stage and group, of the
      predicted (Corollary 3.1) and measured (median/min/max over tensors) steps to equilibrium.

    A chart or table without data is skipped. Rank 0 only; nothing without a ``WandbLogger``.
    Costs a few tables of at most ``_MAX_ROWS`` rows: call it where figures are rendered,
    not every step.
    """
    if series.is_empty() or not wandb_loggers(trainer):
        return
    import wandb

    specs = _concern_specs(series)
    if not specs:
        return

    def make() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, spec in specs.items():
            if spec["kind"] == "lines":
                out[key] = wandb.plot.line_series(spec["xs"], spec["ys"], keys=spec["keys"], title=spec["title"],
                                                  xname="optimizer step")
            else:
                out[key] = wandb.Table(columns=spec["columns"], data=spec["data"])
        return out

    log_to_wandb(trainer, make, step)


def _concern_specs(series: RunSeries) -> dict[str, dict[str, Any]]:
    """What :func:`log_concern_charts` logs, as plain data (no wandb): key → lines or table."""
    specs: dict[str, dict[str, Any] | None] = {
        "smd_angular_update/per_tensor": _angular_update_lines(series),
        "smd_angular_update/ratio": _ratio_stat_lines(series),
        "smd_weight_norm/layer": _weight_norm_layer_lines(series),
        "smd_weight_norm/ratio": _weight_norm_ratio_lines(series),
        "smd_rescale/events": _rescale_table(series),
        "smd_equilibrium/fraction": _fraction_lines(series),
        "smd_equilibrium/steps_to_equilibrium": _steps_to_equilibrium_table(series),
    }
    return {key: spec for key, spec in specs.items() if spec}


def _points(steps: np.ndarray, values: np.ndarray, limit: int) -> tuple[list[int], list[float]] | None:
    """The finite points of one line as plain lists, at most ``limit`` of them.

    Runs of equal values (a piecewise-constant theory line) keep only their ends, which draws the
    same line; what is left is thinned evenly, first and last points kept.
    """
    keep = np.isfinite(values)
    x, y = steps[keep], values[keep]
    if x.size == 0:
        return None
    if x.size > 2:
        inner = (y[1:-1] != y[:-2]) | (y[1:-1] != y[2:])
        mask = np.concatenate(([True], inner, [True]))
        x, y = x[mask], y[mask]
    if x.size > limit:
        index = np.unique(np.linspace(0, x.size - 1, limit).round().astype(int))
        x, y = x[index], y[index]
    return [int(v) for v in x], [float(v) for v in y]


def _lines(series: RunSeries, columns: Sequence[tuple[str, np.ndarray]], title: str) -> dict[str, Any] | None:
    """A ``line_series`` spec from ``(label, values[T])`` pairs, within the point budget."""
    columns = [(label, values) for label, values in columns if np.isfinite(values).any()]
    if not columns:
        return None
    limit = max(_MIN_POINTS, min(_MAX_POINTS, _MAX_ROWS // len(columns)))
    xs, ys, keys = [], [], []
    for label, values in columns:
        points = _points(series.steps, values, limit)
        if points is not None:
            xs.append(points[0])
            ys.append(points[1])
            keys.append(label)
    return {"kind": "lines", "xs": xs, "ys": ys, "keys": keys, "title": title}


def _constant(series: RunSeries, like: np.ndarray, value: float) -> np.ndarray:
    """``value`` at the first and last step where ``like`` (``[T]`` or ``[T, N]``) has data."""
    rows = np.isfinite(like) if like.ndim == 1 else np.isfinite(like).any(axis=1)
    out = np.full(series.num_steps, np.nan)
    index = np.flatnonzero(rows)
    if index.size:
        out[[index[0], index[-1]]] = value
    return out


def _tensor_columns(series: RunSeries, values: np.ndarray) -> list[int]:
    """Columns with data, at most ``_MAX_TENSOR_LINES`` of them, evenly spaced input → output."""
    columns = [j for j in range(len(series.names)) if np.isfinite(values[:, j]).any()]
    if len(columns) > _MAX_TENSOR_LINES:
        pick = np.unique(np.linspace(0, len(columns) - 1, _MAX_TENSOR_LINES).round().astype(int))
        columns = [columns[i] for i in pick]
    return columns


def _of_total(shown: int, total: int) -> str:
    return f"{total} tensors" if shown == total else f"{shown} of {total} tensors"


def _angular_update_lines(series: RunSeries) -> dict[str, Any] | None:
    from lightning_smd.report.figures import unique_columns

    columns = _tensor_columns(series, series.angular_update)
    if not columns:
        return None
    lines = [(f"Δ_t {series.names[j]}", series.angular_update[:, j]) for j in columns]
    theory = unique_columns(series.angular_update_theory)[:_MAX_THEORY_LINES]
    for j in theory:
        label = "Δ* theory" if len(theory) == 1 else f"Δ* theory ({series.names[j]})"
        lines.append((label, series.angular_update_theory[:, j]))
    total = int(np.isfinite(series.angular_update).any(axis=0).sum())
    return _lines(series, lines, f"Angular update Δ_t per tensor vs theory Δ* ({_of_total(len(columns), total)})")


def _ratio_stat_lines(series: RunSeries) -> dict[str, Any] | None:
    stats = [(f"Δ_t/Δ* {stat}", series.ratio_stats[stat]) for stat in ("mean", "min", "max")
             if stat in series.ratio_stats]
    if not stats:
        return None
    stats.append(("equilibrium (1)", _constant(series, np.vstack([v for _, v in stats]).T, 1.0)))
    return _lines(series, stats, "Angular update ratio Δ_t/Δ* across tensors (1 at equilibrium)")


def _weight_norm_layer_lines(series: RunSeries) -> dict[str, Any] | None:
    from lightning_smd.report.figures import default_layer

    layer = default_layer(series)
    if layer is None:
        return None
    j = series.names.index(layer)
    return _lines(series, [(f"‖w_t‖ {layer}", series.weight_norm[:, j]),
                           (f"predicted ‖w*‖ {layer}", series.weight_norm_theory[:, j])],
                  f"Weight norm vs predicted equilibrium: {layer}")


def _weight_norm_ratio_lines(series: RunSeries) -> dict[str, Any] | None:
    theory = np.where(series.weight_norm_theory > 0, series.weight_norm_theory, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = series.weight_norm / theory
    columns = _tensor_columns(series, ratio)
    if not columns:
        return None
    lines = [(f"‖w_t‖/‖w*‖ {series.names[j]}", ratio[:, j]) for j in columns]
    lines.append(("equilibrium (1)", _constant(series, ratio[:, columns], 1.0)))
    total = int(np.isfinite(ratio).any(axis=0).sum())
    title = f"Weight norm over predicted equilibrium ‖w_t‖/‖w*‖ ({_of_total(len(columns), total)})"
    return _lines(series, lines, title)


def _lr_changes(series: RunSeries) -> list[tuple[int, float | None]]:
    """``(first logged step with the new rate, new/old LR or None)`` per LR change."""
    from lightning_smd.report.figures import lr_change_steps

    out = []
    index = {int(s): i for i, s in enumerate(series.steps)}
    # exact steps where the callback saw a new rate: rescales and stage starts (predicted keys)
    exact = {int(s) for s, _ in series.rescale_events}
    for key, values in series.extra.items():
        if key.startswith("smd/steps_to_equilibrium/predicted/"):
            exact.update(int(series.steps[i]) for i in np.flatnonzero(np.isfinite(values)))
    for before in lr_change_steps(series):
        i = index[before]
        if i + 1 >= series.num_steps:
            continue
        after = int(series.steps[i + 1])
        step = min((s for s in exact if before < s <= after), default=after)
        factor = None
        for values in series.lr.values():
            old, later = values[i], values[i + 1:]
            new = later[np.isfinite(later)]
            if math.isfinite(old) and old > 0 and new.size and abs(new[0] / old - 1) > 1e-12:
                factor = float(new[0] / old)
                break
        out.append((step, factor))
    return out


def _rescale_table(series: RunSeries) -> dict[str, Any] | None:
    rows = [[int(s), "rescale", float(f)] for s, f in series.rescale_events]
    rows += [[s, "lr_change", f] for s, f in _lr_changes(series)]
    if not rows:
        return None
    rows.sort(key=lambda row: (row[0], row[1] != "lr_change"))
    return {"kind": "table", "columns": ["step", "event", "factor"], "data": rows}


def _fraction_lines(series: RunSeries) -> dict[str, Any] | None:
    fraction = series.extra.get("smd/equilibrium/fraction")
    if fraction is None:
        return None
    return _lines(series, [("fraction in equilibrium", fraction)], "Fraction of tensors in equilibrium")


def _steps_to_equilibrium_table(series: RunSeries) -> dict[str, Any] | None:
    """One row per LR stage (and group): predicted vs measured steps to equilibrium.

    A stage starts where ``smd/steps_to_equilibrium/predicted/{group}`` is logged (the first
    stage, at step 0, has no prediction). A tensor's measured steps belong to the stage that
    started at ``equilibrium_step - measured`` (both logged at the same step).
    """
    predicted_prefix, measured_prefix = "smd/steps_to_equilibrium/predicted/", "smd/steps_to_equilibrium/measured/"
    stages: dict[tuple[int, str], float | None] = {}
    for key, values in series.extra.items():
        if key.startswith(predicted_prefix):
            for i in np.flatnonzero(np.isfinite(values)):
                stages[(int(series.steps[i]), key[len(predicted_prefix):])] = float(values[i])
    measured: dict[int, list[float]] = {}
    for key, values in series.extra.items():
        if not key.startswith(measured_prefix):
            continue
        reached = series.extra.get(f"smd/equilibrium_step/{key[len(measured_prefix):]}")
        for i in np.flatnonzero(np.isfinite(values)):
            start = int(round(reached[i] - values[i])) if reached is not None and math.isfinite(reached[i]) else None
            if start is not None:
                measured.setdefault(start, []).append(float(values[i]))
    for start in measured:
        if not any(s == start for s, _ in stages):
            stages[(start, "")] = None
    if not stages:
        return None
    rescaled = {int(s) for s, _ in series.rescale_events}
    rows = []
    for (start, group), predicted in sorted(stages.items()):
        values = sorted(measured.get(start, []))
        rows.append([start, group, start in rescaled, None if predicted is None else int(round(predicted)),
                     float(np.median(values)) if values else None, min(values) if values else None,
                     max(values) if values else None, len(values)])
    columns = ["stage_start_step", "group", "rescaled", "predicted_steps", "measured_steps_median",
               "measured_steps_min", "measured_steps_max", "tensors_reached"]
    return {"kind": "table", "columns": columns, "data": rows}
