"""Figures and tables of a run's Spherical Motion Dynamics, from a :class:`RunSeries`.

Figures (PNG, matplotlib's object-oriented API with the Agg canvas, so a user's pyplot state
and backend are never touched):

* ``smd_angular_update.png``: Δ_t of every scale-invariant tensor (thin lines, one colour map,
  input → output) with Δ* dashed, log scale, LR changes and rescale events marked
  (SMD paper, Fig. 3 a/b);
* ``smd_weight_norm.png``: ‖w_t‖ of one tensor with the predicted equilibrium ‖w*‖ dashed
  (Fig. 2 b/e);
* ``smd_ratio_heatmap.png``: tensors × steps heatmap of Δ_t/Δ*, diverging and centred at 1 on
  a log scale;
* ``smd_unit_grad_sq.png``: the running estimate of the unit-gradient statistic L per tensor
  (Fig. 2 a/d).

Tables: :func:`summary_rows` (one dict per tensor) and :func:`markdown_summary`.

Command line, on a finished run's CSV logs, TensorBoard event files or offline W&B run::

    python -m lightning_smd.report RUN_DIR [--out DIR] [--layer NAME] [--all]

It writes into ``RUN_DIR/smd_report/`` (never over the callback's own ``smd/`` figures) every
figure the live run renders: these four and the per-channel ones (bands from the logged
percentiles, the heatmap from the ``smd_channel_heatmap.npz`` the callback left), and says which
log it read (CSV, TensorBoard or W&B). A folder holding several runs is refused with the list of
them; ``--all`` reports each.

matplotlib is optional (``examples`` extra): without it :func:`save_figures` warns once and
returns ``{}``.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lightning_smd.report.series import RunSeries

__all__ = [
    "FIGURE_FILES",
    "draw_angular_update",
    "lr_change_steps",
    "lr_changes",
    "main",
    "markdown_summary",
    "plot_angular_update",
    "plot_ratio_heatmap",
    "plot_unit_grad_sq",
    "plot_weight_norm",
    "save_figures",
    "summary_rows",
    "theory_steps",
]

#: File name of each figure written by :func:`save_figures`.
FIGURE_FILES = {
    "angular_update": "smd_angular_update.png",
    "weight_norm": "smd_weight_norm.png",
    "ratio_heatmap": "smd_ratio_heatmap.png",
    "unit_grad_sq": "smd_unit_grad_sq.png",
}
SUMMARY_FILE = "smd_summary.md"
#: Folder (inside the run dir) the report command writes to by default.
REPORT_DIR = "smd_report"

#: every Δ_t/Δ* colour scale (this heatmap, the per-unit one) spans [1/RATIO_SPAN, RATIO_SPAN] on a
#: log scale centred on 1, in every run, so two runs' figures compare; values beyond it saturate
RATIO_SPAN = 10.0
RATIO_LABEL = "$\\Delta_t\\,/\\,\\Delta^*$  (1 = equilibrium)\nlog scale, fixed 0.1–10 in every run"
_DPI = 110
_WIDE = (10.0, 5.0)
_CMAP = "viridis"
_LEGEND_MAX = 8  # above this many tensors, a colour bar replaces the legend
_LABELS_MAX = 40  # most tensor names written on the heatmap's y-axis
_LR_CHANGE_MIN = 0.1  # relative change of Δ* (or lr) that counts as an LR change
_LR_CHANGES_MAX = 12  # more changes than this is a continuous schedule: no markers
_warned_no_matplotlib = False


# ------------------------------------------------------------------ helpers
def _matplotlib_available() -> bool:
    global _warned_no_matplotlib
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not _warned_no_matplotlib:
            warnings.warn(
                "lightning_smd: matplotlib is not installed, SMD figures are skipped "
                "(pip install 'lightning-smd[examples]' or matplotlib).",
                stacklevel=3,
            )
            _warned_no_matplotlib = True
        return False
    return True


def _new_figure(size: tuple[float, float] = _WIDE, left: float = 1.0, right: float = 0.3, bottom: float = 0.55,
                top: float = 0.4) -> Any:
    """A Figure on the Agg canvas whose subplot area leaves fixed margins (inches) for the labels.

    Fixed margins instead of a layout engine: constrained/tight layout measures every text of the
    figure before drawing it and was half the render time of a 50-layer run's figures."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=_DPI)
    width, height = size
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)
    return fig


#: zlib level of the PNGs: 1 encodes in half the time of Pillow's default 6 for files ~5 % larger
#: (lossless either way)
PNG_COMPRESS_LEVEL = 1


def save_png(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at the figures' dpi (fast zlib level, see :data:`PNG_COMPRESS_LEVEL`)."""
    fig.savefig(path, dpi=_DPI, pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return Path(path)


def _save(fig: Any, path: Path) -> Path:
    save_png(fig, path)
    fig.clear()
    return path


def _has_data(values: np.ndarray) -> bool:
    return values.size > 0 and bool(np.isfinite(values).any())


def _colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps[_CMAP]
    return [cmap(x) for x in np.linspace(0.05, 0.9, max(count, 1))]


def _short(name: str, width: int = 38) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _relative_change(values: np.ndarray) -> np.ndarray:
    """Indices i (into ``values``) of the last finite value before a relative change of more than
    ``_LR_CHANGE_MIN`` (the change happened after that logged step, before the next one)."""
    finite = np.flatnonzero(np.isfinite(values) & (values > 0))
    if finite.size < 2:
        return np.array([], dtype=int)
    v = values[finite]
    jumps = np.abs(np.log(v[1:] / v[:-1])) > math.log1p(_LR_CHANGE_MIN)
    return finite[:-1][jumps]


def lr_change_steps(series: RunSeries) -> list[int]:
    """Steps after which the learning rate changed (the last logged step with the old rate).

    Read from the logged ``lr-*`` series if any (a change: more than 10 % between logged
    points), else inferred from jumps of more than 10 % of the median Δ* (Δ* ∝ √η).
    Continuous schedules (more than 12 such jumps, e.g. cosine) give an empty list.
    """
    if series.lr:
        candidates = [_relative_change(v) for v in series.lr.values()]
    elif _has_data(series.angular_update_theory):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(series.angular_update_theory, axis=1)
        candidates = [_relative_change(median)]
    else:
        return []
    indices = np.unique(np.concatenate(candidates)) if candidates else np.array([], dtype=int)
    if indices.size > _LR_CHANGES_MAX:
        return []
    return [int(series.steps[i]) for i in indices]


def _exact_change_steps(series: RunSeries) -> set[int]:
    """Steps the callback logged at an LR change itself: rescales and the starts of LR stages
    (``smd/steps_to_equilibrium/predicted/*``, logged at the first step with the new rate)."""
    exact = {int(step) for step, _ in series.rescale_events}
    for key, values in series.extra.items():
        if key.startswith("smd/steps_to_equilibrium/predicted/"):
            exact.update(int(series.steps[i]) for i in np.flatnonzero(np.isfinite(values)))
    return exact


def lr_changes(series: RunSeries) -> list[int]:
    """Steps at which the learning rate changed: the first optimizer step run with the new rate,
    the step number the callback prints and logs (``SMD: step 440: group … lr 0.2 → 0.02``).

    Each change of :func:`lr_change_steps` (last logged step with the old rate) is placed at the
    step the callback logged for it (a rescale, or the start of an LR stage), else at the next
    logged step, the first one known to have the new rate.
    """
    exact = _exact_change_steps(series)
    index = {int(s): i for i, s in enumerate(series.steps)}
    out = []
    for before in lr_change_steps(series):
        i = index[before]
        after = int(series.steps[i + 1]) if i + 1 < series.num_steps else before + 1
        out.append(min((s for s in exact if before <= s <= after), default=after))
    return out


def theory_steps(steps: np.ndarray, values: np.ndarray, events: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The points of a theory line to draw with ``drawstyle="steps-post"`` (each value holds from
    its step to the next point), changing at the exact step of the event that changed it.

    A logged theory value is the value at its step; between two logged points the value changed at
    an unknown step, unless an event (an LR change, a rescale: :func:`lr_changes`) lies in
    ``(previous logged step, this one]``: then the new value starts at that event's step. Missing
    and non-positive values are dropped.
    """
    keep = np.isfinite(values) & (values > 0)
    xs, ys = steps[keep].astype(float), values[keep]
    if xs.size < 2 or not len(events):
        return xs, ys
    out_x, out_y = [xs[0]], [ys[0]]
    marks = np.asarray(sorted(events), dtype=float)
    for i in range(1, xs.size):
        if ys[i] != ys[i - 1]:
            inside = marks[(marks > xs[i - 1]) & (marks <= xs[i])]
            if inside.size and inside[0] < xs[i]:
                out_x.append(inside[0])
                out_y.append(ys[i])
        out_x.append(xs[i])
        out_y.append(ys[i])
    return np.asarray(out_x), np.asarray(out_y)


def _mark_events(ax: Any, series: RunSeries) -> None:
    """Vertical lines: LR changes (grey, dash-dot) and rescale events (red, dotted)."""
    for k, step in enumerate(lr_changes(series)):
        ax.axvline(step, color="0.35", lw=1.0, ls="-.", label="LR change" if k == 0 else None)
    for k, (step, factor) in enumerate(series.rescale_events):
        label = f"rescale (×{factor:.3g})" if k == 0 else None
        ax.axvline(step, color="tab:red", lw=1.2, ls=":", label=label)


def unique_columns(values: np.ndarray, rtol: float = 1e-6) -> list[int]:
    """Indices of the columns of ``values`` that differ from all earlier ones (NaN = NaN)."""
    kept: list[int] = []
    for j in range(values.shape[1]):
        column = values[:, j]
        if not np.isfinite(column).any():
            continue
        if not any(np.allclose(column, values[:, k], rtol=rtol, equal_nan=True) for k in kept):
            kept.append(j)
    return kept


def _plot_lines(ax: Any, series: RunSeries, values: np.ndarray, names: Sequence[str]) -> None:
    """One thin line per tensor, coloured from input to output; legend or colour bar."""
    colors = _colors(len(names))
    many = len(names) > _LEGEND_MAX
    for j, name in enumerate(names):
        keep = np.isfinite(values[:, j]) & (values[:, j] > 0)
        ax.plot(
            series.steps[keep], values[keep, j], color=colors[j], lw=0.8, alpha=0.75 if many else 0.95,
            label=None if many else _short(name),
        )
    if many:
        _colorbar(ax, len(names))


def _lines_right_margin(series: RunSeries) -> float:
    """Right margin (inches) of a one-line-per-tensor figure: room for the colour bar's labels."""
    return 0.1 if len(series.names) > _LEGEND_MAX else 0.3  # the bar takes its room from the axes


def _colorbar(ax: Any, count: int) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(0, count - 1), cmap=_CMAP)
    bar = ax.figure.colorbar(mappable, ax=ax, pad=0.01, aspect=30)
    bar.set_label(f"tensor index, input → output ({count} tensors)")


def _finish_axes(ax: Any, title: str, ylabel: str, log: bool = True) -> None:
    ax.set_title(title, y=1.0)  # a fixed position: matplotlib's automatic one measures every tick label
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small", framealpha=0.85)


# ------------------------------------------------------------------ figures
def draw_angular_update(ax: Any, series: RunSeries, title: str | None = None) -> None:
    """Draw Δ_t per tensor with Δ* dashed (log y), LR changes and rescales marked, on a
    matplotlib ``ax`` (to compose figures, e.g. runs side by side)."""
    _plot_lines(ax, series, series.angular_update, series.names)
    events = lr_changes(series)
    for k, j in enumerate(unique_columns(series.angular_update_theory)):
        steps, theory = theory_steps(series.steps, series.angular_update_theory[:, j], events)
        ax.plot(steps, theory, color="black", lw=1.6, ls="--", drawstyle="steps-post",
                label=r"theory $\Delta^*$" if k == 0 else None)
    _mark_events(ax, series)
    default = r"Angular update per step: measured $\Delta_t$ (solid) vs theory $\Delta^*$ (dashed)"
    _finish_axes(ax, title or default, r"angular update $\Delta_t$ [rad]")


def plot_angular_update(series: RunSeries, path: Path) -> Path | None:
    """Δ_t per tensor with Δ* dashed (log y), LR changes and rescales marked; None without data."""
    if not _has_data(series.angular_update):
        return None
    fig = _new_figure(right=_lines_right_margin(series))
    draw_angular_update(fig.add_subplot(), series)
    return _save(fig, path)


def default_layer(series: RunSeries) -> str | None:
    counts = np.isfinite(series.weight_norm).sum(axis=0) if series.names else np.array([])
    if counts.size == 0 or counts.max() == 0:
        return None
    return series.names[int(np.argmax(counts))]


def plot_weight_norm(series: RunSeries, path: Path, layer: str | None = None) -> Path | None:
    """‖w_t‖ of one tensor with its predicted equilibrium ‖w*‖ dashed."""
    if layer is not None and layer not in series.names:
        raise KeyError(f"unknown tensor {layer!r}; logged tensors: {', '.join(series.names)}")
    layer = layer or default_layer(series)
    if layer is None:
        return None
    steps, norm = series.series("weight_norm", layer)
    if norm.size == 0:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot(steps, norm, color="tab:blue", lw=1.2, label=r"measured $\|w_t\|$")
    j = series.names.index(layer)
    t_steps, theory = theory_steps(series.steps, series.weight_norm_theory[:, j], lr_changes(series))
    if theory.size:
        ax.plot(t_steps, theory, color="black", lw=1.6, ls="--", drawstyle="steps-post",
                label=r"predicted equilibrium $\|w^*\|$")
    _mark_events(ax, series)
    _finish_axes(ax, f"Weight norm vs predicted equilibrium: {_short(layer, 60)}",
                 r"weight norm $\|w\|$ (L2)", log=False)
    return _save(fig, path)


def _step_edges(steps: np.ndarray) -> np.ndarray:
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2.0
    return np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])


def plot_ratio_heatmap(series: RunSeries, path: Path) -> Path | None:
    """Tensors × steps heatmap of Δ_t/Δ* on a log colour scale centred at 1."""
    from matplotlib.colors import LogNorm

    ratio = series.ratio
    rows = [j for j in range(ratio.shape[1]) if np.isfinite(ratio[:, j]).any()]
    if not rows:
        return None
    columns = np.flatnonzero(np.isfinite(ratio[:, rows]).any(axis=1))
    data = np.ma.masked_invalid(np.where(ratio > 0, ratio, np.nan)[np.ix_(columns, rows)].T)
    span = RATIO_SPAN
    height = float(np.clip(1.6 + 0.18 * len(rows), 3.5, 12.0))
    longest = max(len(_short(series.names[j], 42)) for j in rows)
    fig = _new_figure((10.0, height), left=0.45 + longest * (0.052 if len(rows) > 15 else 0.066), right=0.95)
    ax = fig.add_subplot()
    cmap = diverging_cmap()
    mesh = ax.pcolormesh(_step_edges(series.steps[columns].astype(float)), np.arange(len(rows) + 1),
                         data, cmap=cmap, norm=LogNorm(1 / span, span), shading="flat")
    bar = fig.colorbar(mesh, ax=ax, pad=0.01, aspect=6 * height, extend="both")
    bar.set_label(RATIO_LABEL)
    plain_log_ticks(bar, span)
    _label_rows(ax, [series.names[j] for j in rows])
    ax.set_ylim(len(rows), 0)
    for step, _ in series.rescale_events:
        ax.axvline(step, color="black", lw=1.0, ls=":")
    ax.set_title(r"$\Delta_t / \Delta^*$ per tensor (blue: slower than theory, red: faster)", y=1.0)
    ax.set_xlabel("optimizer step")
    return _save(fig, path)


def plain_log_ticks(bar: Any, span: float) -> None:
    """Ticks like 0.5, 1, 2 instead of 5×10⁻¹ on the log colour bar."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    candidates = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 10, 20, 50, 100]
    ticks = [t for t in candidates if 1 / span <= t <= span]
    if len(ticks) > 9:
        ticks = [t for t in ticks if t in (0.01, 0.1, 0.2, 0.5, 1, 2, 5, 10, 100)]
    bar.ax.yaxis.set_major_locator(FixedLocator(ticks))
    bar.ax.yaxis.set_minor_locator(NullLocator())
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def diverging_cmap() -> Any:
    from matplotlib import colormaps

    return colormaps["RdBu_r"].with_extremes(bad="0.85")


def _label_rows(ax: Any, names: Sequence[str]) -> None:
    stride = max(1, math.ceil(len(names) / _LABELS_MAX))
    ticks = np.arange(0, len(names), stride)
    ax.set_yticks(ticks + 0.5)
    ax.set_yticklabels([_short(names[i], 42) for i in ticks], fontsize=7 if len(names) > 15 else 9)
    ax.set_ylabel("tensor" if stride == 1 else f"tensor (1 in {stride} labelled, {len(names)} in all)")


def plot_unit_grad_sq(series: RunSeries, path: Path) -> Path | None:
    """Running estimate of L = E‖g̃‖² per tensor (log y)."""
    if not _has_data(series.unit_grad_sq):
        return None
    fig = _new_figure(right=_lines_right_margin(series))
    ax = fig.add_subplot()
    _plot_lines(ax, series, series.unit_grad_sq, series.names)
    _mark_events(ax, series)
    _finish_axes(ax, r"Unit-gradient statistic $L = \mathbb{E}\,\|\tilde g_t\|^2$, "
                 r"$\tilde g_t = g_t\,\|w_t\|$ (running estimate)", r"$L$ (unit-gradient norm$^2$)")
    return _save(fig, path)


def save_figures(series: RunSeries, out_dir: str | Path, layer: str | None = None) -> dict[str, Path]:
    """Write the SMD figures of ``series`` as PNG files into ``out_dir`` (created if needed).

    Args:
        series: the run's data.
        out_dir: destination folder.
        layer: tensor shown in the weight-norm figure; default: the one with the most data.

    Returns:
        ``{figure name: path}`` for the figures written (keys among ``FIGURE_FILES``); a figure
        whose data is absent is skipped. ``{}`` (with a one-time warning) without matplotlib.
    """
    if not _matplotlib_available():
        return {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = {
        "angular_update": lambda p: plot_angular_update(series, p),
        "weight_norm": lambda p: plot_weight_norm(series, p, layer),
        "ratio_heatmap": lambda p: plot_ratio_heatmap(series, p),
        "unit_grad_sq": lambda p: plot_unit_grad_sq(series, p),
    }
    written = {}
    for name, make in makers.items():
        path = make(out / FIGURE_FILES[name])
        if path is not None:
            written[name] = path
    return written


# ------------------------------------------------------------------- tables
def _tail_mean(values: np.ndarray, window: int) -> float | None:
    finite = values[np.isfinite(values)][-window:]
    return float(finite.mean()) if finite.size else None


def _last(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else None


def summary_rows(series: RunSeries, window: int = 20) -> list[dict[str, Any]]:
    """One row per tensor describing where it stands at the end of the run.

    Keys: ``tensor``; ``angular_update`` and ``angular_update_theory`` (means over the last
    ``window`` logged points); ``ratio`` (their quotient); ``weight_norm`` and
    ``weight_norm_theory`` (last logged values); ``equilibrium_step`` (last logged
    ``smd/equilibrium_step/{name}``, else None). Missing values are None.
    """
    rows = []
    for j, name in enumerate(series.names):
        measured = _tail_mean(series.angular_update[:, j], window)
        theory = _tail_mean(series.angular_update_theory[:, j], window)
        ratio = measured / theory if measured is not None and theory else None
        rows.append({
            "tensor": name,
            "angular_update": measured,
            "angular_update_theory": theory,
            "ratio": ratio,
            "weight_norm": _last(series.weight_norm[:, j]),
            "weight_norm_theory": _last(series.weight_norm_theory[:, j]),
            "equilibrium_step": series.equilibrium_step.get(name),
        })
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    headers = {
        "tensor": "tensor", "angular_update": "Δ [rad]", "angular_update_theory": "Δ* [rad]",
        "ratio": "Δ/Δ*", "weight_norm": "‖w‖", "weight_norm_theory": "‖w*‖",
        "equilibrium_step": "equilibrium step",
    }
    lines = ["| " + " | ".join(headers.values()) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [f"`{row['tensor']}`"] + [_fmt(row[key]) for key in list(headers)[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_summary(series: RunSeries, window: int = 20, worst: int = 3, tolerance: float = 0.1) -> str:
    """A short Markdown report: tensor count, median Δ/Δ* at the end, the tensors farthest from
    equilibrium, LR changes and rescale events, and the :func:`summary_rows` table."""
    rows = summary_rows(series, window)
    lines = ["# Spherical Motion Dynamics summary", ""]
    legend = (f"Columns: **Δ** measured angular update per step and **Δ*** its theory value, each the mean of "
              f"the last {window} logged points; **Δ/Δ*** their ratio (1 = equilibrium); **‖w‖** last logged "
              "weight norm and **‖w*‖** its predicted equilibrium; **equilibrium step** the optimizer step from "
              "which Δ/Δ* stayed within the tolerance of 1 in the current LR stage (– = not reached).")
    if not rows:
        return "\n".join(lines + ["No `smd/*` per-tensor series were logged.", ""])
    steps = f"steps {int(series.steps[0])}–{int(series.steps[-1])}" if series.num_steps else "no steps"
    lines.append(f"- **{len(rows)} scale-invariant tensors**, {series.num_steps} logged points ({steps}).")
    ratios = [(r["ratio"], r["tensor"]) for r in rows if r["ratio"] is not None]
    if ratios:
        median = float(np.median([r for r, _ in ratios]))
        lines.append(f"- Median Δ/Δ* over the last {window} logged points: **{median:.3g}** (1 = equilibrium).")
        far = sorted(ratios, key=lambda rt: -abs(math.log(rt[0])) if rt[0] > 0 else -math.inf)[:worst]
        lines.append("- Farthest from equilibrium: " + ", ".join(f"`{t}` ({r:.3g})" for r, t in far) + ".")
    if ratios:
        # the same window as the table below: the summary agrees with what it prints
        inside = sum(1 for r, _ in ratios if abs(r - 1.0) <= tolerance)
        lines.append(f"- Tensors whose Δ/Δ* over the last {window} logged points is within ±{tolerance:g} of 1: "
                     f"{inside} of {len(ratios)} ({100 * inside / len(ratios):.0f} %).")
    fraction = series.extra.get("smd/equilibrium/fraction")
    if fraction is not None and np.isfinite(fraction).any():
        lines.append(f"- Equilibrium verdicts of the callback in the current LR stage (a full `EquilibriumOptions.window` of "
                     f"measured points within the tolerance, logged as smd/equilibrium/fraction): "
                     f"{100 * fraction[np.isfinite(fraction)][-1]:.0f} %; a stage shorter than that window has none yet.")
    changes = lr_changes(series)
    if changes:
        lines.append("- LR changes at steps (first step with the new rate): " + ", ".join(map(str, changes)) + ".")
    if series.rescale_events:
        events = ", ".join(f"step {s} (×{f:.4g})" for s, f in series.rescale_events)
        lines.append(f"- Rescale events: {events}.")
    else:
        lines.append("- No rescale events.")
    return "\n".join(lines + ["", legend, "", *_markdown_table(rows), ""])


# ---------------------------------------------------------------------- CLI
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_smd.report",
        description="Rebuild the SMD figures and smd_summary.md of a finished run from its "
        "CSVLogger metrics.csv, TensorBoard event files or offline W&B run.",
    )
    parser.add_argument("run_dir", type=Path,
                        help="run directory (searched for metrics.csv, events.out.tfevents.*, *.wandb) or the file")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output directory (default: RUN_DIR/{REPORT_DIR}; with --all, OUT/<run>)")
    parser.add_argument("--all", action="store_true", help="report every run below RUN_DIR, each in its own folder")
    parser.add_argument("--layer", default=None, help="tensor for the weight-norm figure (default: most data)")
    parser.add_argument("--window", type=int, default=20, help="logged points averaged in the summary table")
    return parser.parse_args(argv)


_SOURCE_NAMES = {"csv": "CSV (Lightning CSVLogger)", "tensorboard": "TensorBoard event files", "wandb": "W&B offline run"}


def _report_one(series: RunSeries, out: Path, args: argparse.Namespace, where: Path, root: Path | None = None,
                kind: str | None = None) -> int:
    from lightning_smd.report.channel_figures import report_channel_figures

    if kind is not None:
        print(f"read: {_SOURCE_NAMES.get(kind, kind)}, {where}")
    if not series.names:
        print(f"error: no smd/* per-tensor series found in {where}", file=sys.stderr)
        return 2
    try:
        written = save_figures(series, out, layer=args.layer)
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    if _matplotlib_available():
        channel, notes = report_channel_figures(series, root, out)
        written.update(channel)
        for note in notes:
            print(f"note: {note}")
    out.mkdir(parents=True, exist_ok=True)
    summary = out / SUMMARY_FILE
    summary.write_text(markdown_summary(series, window=args.window))
    for path in [*written.values(), summary]:
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lightning_smd.report``; returns the exit status."""
    from lightning_smd.report.series import find_runs

    args = _parse_args(argv)
    base = args.run_dir if args.run_dir.is_dir() else args.run_dir.parent
    if args.all and args.run_dir.is_dir():
        runs = find_runs(args.run_dir)
        if not runs:
            print(f"error: no run logs below {args.run_dir}", file=sys.stderr)
            return 2
        status = 0
        for run in runs:
            if args.out is None:
                out = run.root / REPORT_DIR
            else:
                name = "_".join(run.root.relative_to(args.run_dir).parts) or run.root.name
                out = args.out / name
            print(f"run {run.root}:")
            try:
                status = max(status, _report_one(run.load(), out, args, run.path, run.root, run.kind))
            except (FileNotFoundError, ValueError) as err:
                print(f"error: {err}", file=sys.stderr)
                status = 2
        return status
    try:
        source = _single_source(args.run_dir)
        series = source.load()
    except (FileNotFoundError, ValueError) as err:  # includes MultipleRunsError, which lists the runs
        print(f"error: {err}", file=sys.stderr)
        return 2
    search = args.run_dir if args.run_dir.is_dir() else source.root  # where the callback's smd/ may lie
    return _report_one(series, args.out or base / REPORT_DIR, args, source.path, search, source.kind)


def _single_source(path: Path) -> Any:
    """The :class:`~lightning_smd.report.series.RunSource` of the one run at ``path`` (a folder or a log file)."""
    from lightning_smd.report.series import MultipleRunsError, RunSource, kind_of_file, find_runs

    if path.is_file():
        return RunSource(path.parent, kind_of_file(path), path)
    runs = find_runs(path)
    if not runs:
        raise FileNotFoundError(
            f"no metrics.csv, TensorBoard event file (events.out.tfevents.*) or .wandb run file below {path}")
    if len(runs) > 1:
        raise MultipleRunsError(path, runs)
    return runs[0]


if __name__ == "__main__":
    raise SystemExit(main())
