"""Pictures of per-channel spherical motion: per-layer quantile bands and a units × steps heatmap of Δ_t/Δ*, and the per-layer histograms sent to TensorBoard and W&B.

Everything is drawn from :class:`~lightning_smd.core.channels.ChannelMetrics` (its thinned per-unit
record and the latest per-unit values) on rank 0; nothing here touches a device tensor.

* :func:`log_histograms`: on each measured step with per-unit statistics, per tracked tensor, the
  per-unit Δ_t/Δ* (``smd/channel_hist/angular_update_ratio/{name}``) and ‖w_t‖
  (``smd/channel_hist/weight_norm/{name}``) as ``SummaryWriter.add_histogram`` on every
  TensorBoard logger and as ``wandb.Histogram`` (W&B's native histogram panels) on every W&B logger.
* :func:`plot_channel_bands`: one panel per layer, the 5–95 % and 25–75 % bands and the median of
  Δ_t/Δ* over its units against the step, with Δ* (1) and the stall threshold (0.1).
* :func:`plot_channel_heatmap`: Δ_t/Δ* of every unit of one layer (rows) over steps (columns), on a
  log colour scale centred on Δ*; by default the layer with the most stalled units (else the widest
  spread).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lightning_smd.core.channels import STALL_RATIO, ChannelMetrics
from lightning_smd.report.figures import save_png
from lightning_smd.report.loggers import loggers_of_kind

__all__ = ["CHANNEL_FIGURE_FILES", "HIST_PREFIX", "channel_bands", "default_heatmap_layer", "log_histograms",
           "HEATMAP_RECORD", "bands_from_series", "plot_bands", "plot_channel_bands", "plot_channel_heatmap", "plot_unit_heatmap", "report_channel_figures", "save_channel_figures",
           "select_layers"]

HIST_PREFIX = "smd/channel_hist"
CHANNEL_FIGURE_FILES = {"channel_bands": "smd_channel_bands.png", "channel_heatmap": "smd_channel_heatmap.png"}


def _tensorboard_writers(trainer: Any) -> list[Any]:
    return [lg.experiment for lg in loggers_of_kind(trainer, "TensorBoardLogger")]


def log_histograms(trainer: Any, channels: ChannelMetrics, step: int) -> None:
    """The per-unit distributions of the last per-channel step, per layer, to TensorBoard and W&B (rank 0)."""
    from lightning_smd.report import wandb_extras

    values: dict[str, np.ndarray] = {}
    for name, ratio in channels.latest.items():
        kind = "angular_update_ratio" if channels.has_theory.get(name) else "angular_update"
        for key, v in ((f"{HIST_PREFIX}/{kind}/{name}", ratio),
                       (f"{HIST_PREFIX}/weight_norm/{name}", channels.latest_norm.get(name))):
            if v is not None and (finite := v[np.isfinite(v)]).size:
                values[key] = finite
    if not values:
        return
    for writer in _tensorboard_writers(trainer):
        for key, v in values.items():
            writer.add_histogram(key, v, global_step=int(step))
    if wandb_extras.wandb_loggers(trainer):
        import wandb

        wandb_extras.log_to_wandb(trainer, lambda: {k: wandb.Histogram(v) for k, v in values.items()}, step)


#: above this many layers the bands figure shows a selection (the heatmap keeps every unit of its layer)
BANDS_MAX_PANELS = 9
#: of the selection, how many are the layers farthest from Δ*; first, middle and last complete it
BANDS_FARTHEST = 6
_BAND_QUANTILES = (5, 25, 50, 75, 95)
#: y range of every bands panel, the same in every run unless the bands go beyond it (log scale)
BANDS_YLIM = (0.03, 30.0)


def _figure(size: tuple[float, float]) -> Any:
    """A matplotlib Figure on the Agg canvas (pyplot's state is never touched), or None."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=size, dpi=110)


def _percentiles(matrix: np.ndarray, quantiles: tuple[int, ...]) -> np.ndarray:
    """``[len(quantiles), steps]`` percentiles over the units (rows) of the positive values."""
    positive = np.where(matrix > 0, matrix, np.nan)
    with np.errstate(invalid="ignore"), _quiet():
        if np.isfinite(positive).all():  # the usual case, ~10× faster than nanpercentile
            return np.percentile(positive, quantiles, axis=0)
        return np.nanpercentile(positive, quantiles, axis=0)


def _band_layers(channels: ChannelMetrics) -> list[str]:
    return [n for n, h in channels.history.items() if h.columns and channels.has_theory.get(n)]


def channel_bands(channels: ChannelMetrics, layers: list[str] | None = None,
                  ) -> dict[str, tuple[np.ndarray, dict[int, np.ndarray]]]:
    """Per layer with a Δ* (of ``layers``, default all): ``(steps, {q: the q-th percentile over units
    of Δ_t/Δ*})`` for q in 5, 25, 50, 75, 95."""
    out = {}
    for name in layers if layers is not None else _band_layers(channels):
        history = channels.history[name]
        q = _percentiles(history.matrix(), _BAND_QUANTILES)
        out[name] = (np.asarray(history.steps), dict(zip(_BAND_QUANTILES, q)))
    return out


def _tail_medians(channels: ChannelMetrics, layers: list[str]) -> dict[str, tuple[np.ndarray, dict[int, np.ndarray]]]:
    """What :func:`select_layers` reads (the median over units on the last quarter of the steps; NaN
    before), without the percentiles of every step of every layer."""
    out = {}
    for name in layers:
        history = channels.history[name]
        n = len(history.columns)
        tail = max(1, n // 4)
        median = np.full(n, np.nan)
        median[n - tail:] = _percentiles(np.stack(history.columns[n - tail:], axis=1), (50,))[0]
        out[name] = (np.asarray(history.steps), {50: median})
    return out


def select_layers(bands: dict[str, tuple[np.ndarray, dict[int, np.ndarray]]],
                  most: int = BANDS_MAX_PANELS) -> tuple[list[str], str]:
    """The layers to draw, in network order, and a sentence saying how they were chosen.

    All of them up to ``most``; else the :data:`BANDS_FARTHEST` layers whose median Δ_t/Δ* over the
    last quarter of their steps is farthest from 1 (|log|), plus the first, middle and last layer.
    """
    names = list(bands)
    if len(names) <= most:
        return names, f"all {len(names)} layers"

    def distance(name: str) -> float:
        median = bands[name][1][50]
        tail = median[len(median) - max(1, len(median) // 4):]
        tail = tail[np.isfinite(tail) & (tail > 0)]
        return float(abs(np.log(np.median(tail)))) if tail.size else -1.0

    anchors = {names[0], names[len(names) // 2], names[-1]}
    farthest = [n for n in sorted(names, key=distance, reverse=True) if n not in anchors][:max(most - 3, 1)]
    farthest = farthest[:BANDS_FARTHEST]
    chosen = [n for n in names if n in anchors or n in farthest]
    return chosen, (f"{len(chosen)} of {len(names)} layers: the {len(farthest)} farthest from $\\Delta^*$ "
                    "(median over the last quarter of the run), and the first, middle and last")


def plot_bands(bands: dict[str, tuple[np.ndarray, dict[int, np.ndarray]]], path: str | Path,
               stalled: dict[str, float] | None = None, source: str = "", how: str | None = None) -> Path | None:
    """Per layer (a selection above :data:`BANDS_MAX_PANELS` layers, see :func:`select_layers`), the
    bands over units of Δ_t/Δ* against the step: 5–95 % (and 25–75 % where given) and the median,
    with Δ* (1) and the stall threshold; one title and one legend for the figure. ``None`` without data.
    ``how``: the selection is already made (``bands`` holds the layers to draw) and this says how."""
    if not bands:
        return None
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    layers, how = (list(bands), how) if how is not None else select_layers(bands)
    cols = min(4 if len(layers) > 9 else 3, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = _figure((3.3 * cols, 2.3 * rows + 1.0))
    if fig is None:
        return None
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    stalled = stalled or {}
    limits = _band_limits([bands[n][1] for n in layers])
    for ax, name in zip(axes.flat, layers):
        steps, q = bands[name]
        ax.fill_between(steps, q[5], q[95], alpha=0.2, color="C0", lw=0, label="5–95 % of units")
        if 25 in q and 75 in q:
            ax.fill_between(steps, q[25], q[75], alpha=0.35, color="C0", lw=0, label="25–75 %")
        ax.plot(steps, q[50], color="C0", lw=1.2, label="median unit")
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label=r"$\Delta^*$ (ratio 1)")
        ax.axhline(STALL_RATIO, color="C3", lw=0.8, ls=":", label=f"stalled (< {STALL_RATIO:g})")
        share = stalled.get(name)
        # a fixed title position and fixed, few ticks: matplotlib's automatic ones cost ~1 s per panel
        ax.set_title(_short(name) + ("" if share is None else f" (stalled {share:.0%})"), fontsize=7, y=1.0)
        ax.set_yscale("log")
        ax.set_ylim(*limits)
        # only the decades in view: a locator's every value becomes a Tick object, drawn or not
        ax.yaxis.set_major_locator(FixedLocator([10.0 ** k for k in range(-4, 5) if limits[0] <= 10.0 ** k <= limits[1]]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
        ax.tick_params(labelsize=6)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    for ax in axes.flat:
        ax.label_outer()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    top = 1.0 - 0.62 / fig.get_figheight()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, top + 0.02))
    title = r"Per-unit angular update $\Delta_t/\Delta^*$ over the units of each layer" + "\n" + how
    fig.suptitle(title + (f"\n{source}" if source else ""), fontsize=9, y=0.995)
    fig.supxlabel("optimizer step", fontsize=8)
    fig.supylabel(r"$\Delta_t\,/\,\Delta^*$ per unit (log)", fontsize=8)
    fig.subplots_adjust(left=0.07 if cols > 2 else 0.12, right=0.98, bottom=0.55 / fig.get_figheight(),
                        top=top - 0.25 / fig.get_figheight(), hspace=0.45, wspace=0.08)
    return save_png(fig, path)


def _band_limits(quantiles: list[dict[int, np.ndarray]]) -> tuple[float, float]:
    """:data:`BANDS_YLIM` in every run, widened to whole decades only where the bands go beyond it."""
    low, high = BANDS_YLIM
    values = np.concatenate([np.concatenate([q[5], q[95]]) for q in quantiles]) if quantiles else np.zeros(0)
    values = values[np.isfinite(values) & (values > 0)]
    if values.size:
        low = min(low, 10.0 ** np.floor(np.log10(values.min())))
        high = max(high, 10.0 ** np.ceil(np.log10(values.max())))
    return max(low, 1e-4), min(high, 1e4)


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot_channel_bands(channels: ChannelMetrics, path: str | Path) -> Path | None:
    """Per layer, quantile bands of Δ_t/Δ* over units against the step (:func:`plot_bands`); ``None`` without data."""
    layers = _band_layers(channels)
    if len(layers) <= BANDS_MAX_PANELS:
        return plot_bands(channel_bands(channels, layers), path, channels.stalled)
    chosen, how = select_layers(_tail_medians(channels, layers))  # percentiles of the drawn layers only
    return plot_bands(channel_bands(channels, chosen), path, channels.stalled, how=how)


def default_heatmap_layer(channels: ChannelMetrics) -> str | None:
    """The layer with the most stalled units; among equals, the widest p95/p05 spread of Δ_t/Δ*."""
    return _heatmap_choice(channels)[0]


def _heatmap_choice(channels: ChannelMetrics) -> tuple[str | None, str]:
    def spread(name: str) -> float:
        latest = channels.latest.get(name)
        finite = latest[np.isfinite(latest) & (latest > 0)] if latest is not None else np.zeros(0)
        return float(np.percentile(finite, 95) / np.percentile(finite, 5)) if finite.size else 0.0

    names = [n for n, h in channels.history.items() if h.columns]
    if not names:
        return None, ""
    best = max(names, key=lambda n: (channels.stalled.get(n, 0.0), spread(n)))
    if channels.stalled.get(best, 0.0) > 0:
        return best, f"shown: the layer with the most stalled units ({channels.stalled[best]:.0%})"
    return best, f"shown: the layer whose units spread most (p95/p5 of the last step {spread(best):.3g}), none stalled"


def plot_channel_heatmap(channels: ChannelMetrics, path: str | Path, layer: str | None = None) -> Path | None:
    """Δ_t/Δ* of every unit of ``layer`` (default :func:`default_heatmap_layer`) over steps, on the
    fixed log colour scale of every ratio figure (0.1–10, centred on 1)."""
    why = "shown: as asked (layer=...)" if layer else ""
    if layer is None:
        layer, why = _heatmap_choice(channels)
    if layer is None or layer not in channels.history or not channels.history[layer].columns:
        return None
    history = channels.history[layer]
    return plot_unit_heatmap(history.steps, history.matrix(), layer, path, channels.has_theory.get(layer, False),
                             channels.stalled.get(layer), why)


def plot_unit_heatmap(steps: Any, matrix: np.ndarray, layer: str, path: str | Path, theory_known: bool = True,
                      stalled: float | None = None, why: str = "") -> Path | None:
    """``matrix[units, steps]`` of one layer as a heatmap: Δ_t/Δ* (fixed log scale 0.1–10, centred
    on 1) where Δ* is known, else Δ_t in radians (log colour scale)."""
    from matplotlib.colors import LogNorm

    from lightning_smd.report.figures import RATIO_LABEL, RATIO_SPAN, diverging_cmap, plain_log_ticks

    fig = _figure((8.0, 4.0))
    if fig is None:
        return None
    matrix = np.asarray(matrix, dtype=np.float64)
    data = np.ma.masked_invalid(np.where(matrix > 0, matrix, np.nan))
    steps = list(steps)
    ax = fig.add_subplot()
    extent = (steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1, matrix.shape[0] - 0.5, -0.5)
    if theory_known:
        image = ax.imshow(data, aspect="auto", cmap=diverging_cmap(), norm=LogNorm(1 / RATIO_SPAN, RATIO_SPAN),
                          extent=extent, interpolation="nearest")
        label = RATIO_LABEL
    else:
        image = ax.imshow(data, aspect="auto", cmap="viridis", norm=LogNorm(), extent=extent, interpolation="nearest")
        label = r"$\Delta_t$ [rad] (log scale; no $\Delta^*$ for this layer)"
    bar = fig.colorbar(image, ax=ax, extend="both" if theory_known else "neither")
    bar.set_label(label, fontsize=8)
    if theory_known:
        plain_log_ticks(bar, RATIO_SPAN)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"unit ({matrix.shape[0]})")
    title = f"{_short(layer, 60)}: per-unit angular update" + (f" (stalled {stalled:.0%})" if stalled else "")
    ax.set_title(title + (f"\n{why}" if why else ""), fontsize=9, y=1.0)
    fig.subplots_adjust(left=0.09, right=0.93, bottom=0.13, top=0.85)
    return save_png(fig, path)


#: the units × steps record of the heatmap's layer, written with the figures so that the report
#: command can redraw it (the per-unit values are in no logger's scalars)
HEATMAP_RECORD = "smd_channel_heatmap.npz"


def save_channel_figures(channels: ChannelMetrics | None, out_dir: str | Path, layer: str | None = None) -> dict[str, Path]:
    """Write both per-channel figures into ``out_dir``, and the heatmap's data (:data:`HEATMAP_RECORD`);
    ``{name: path}`` of the figures with data."""
    if channels is None or not channels.history:
        return {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    path = plot_channel_bands(channels, out / CHANNEL_FIGURE_FILES["channel_bands"])
    if path is not None:
        written["channel_bands"] = path
    why = "shown: as asked (layer=...)" if layer else ""
    if layer is None:
        layer, why = _heatmap_choice(channels)
    history = channels.history.get(layer) if layer else None
    if history is not None and history.columns:
        theory_known = bool(channels.has_theory.get(layer, False))
        stalled = channels.stalled.get(layer)
        path = plot_unit_heatmap(history.steps, history.matrix(), layer, out / CHANNEL_FIGURE_FILES["channel_heatmap"],
                                 theory_known, stalled, why)
        if path is not None:
            written["channel_heatmap"] = path
        np.savez(out / HEATMAP_RECORD, steps=np.asarray(history.steps, dtype=np.int64), matrix=history.matrix(),
                 layer=layer, theory_known=theory_known, stalled=np.nan if stalled is None else stalled, why=why)
    return written


def bands_from_series(series: Any) -> tuple[dict[str, tuple[np.ndarray, dict[int, np.ndarray]]], dict[str, float]]:
    """From a finished run's logs (a :class:`~lightning_smd.report.series.RunSeries`): per layer the logged
    percentiles over units ``smd/channel/angular_update/{p05,p50,p95}/{name}`` divided by its Δ*
    at the same step, and the last ``smd/channel/stalled_fraction/{name}``."""
    bands: dict[str, tuple[np.ndarray, dict[int, np.ndarray]]] = {}
    stalled: dict[str, float] = {}
    prefix = "smd/channel/angular_update/p50/"
    for key in series.extra:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name not in series.names:
            continue
        theory = series.angular_update_theory[:, series.names.index(name)]
        q = {}
        for quantile in (5, 50, 95):
            values = series.extra.get(f"smd/channel/angular_update/p{quantile:02d}/{name}")
            if values is None:
                break
            with np.errstate(invalid="ignore", divide="ignore"):
                q[quantile] = values / np.where(theory > 0, theory, np.nan)
        if len(q) < 3:
            continue
        keep = np.isfinite(q[50])
        if keep.any():
            bands[name] = (series.steps[keep], {k: v[keep] for k, v in q.items()})
        fraction = series.extra.get(f"smd/channel/stalled_fraction/{name}")
        if fraction is not None and np.isfinite(fraction).any():
            stalled[name] = float(fraction[np.isfinite(fraction)][-1])
    return bands, stalled


def report_channel_figures(series: Any, search: str | Path | None, out_dir: str | Path,
                           source: str = "") -> tuple[dict[str, Path], list[str]]:
    """The per-channel figures of a finished run, for ``python -m lightning_smd.report``: the bands
    from the logged percentiles (5–95 % and median; the live figure also has 25–75 %), the
    heatmap from the :data:`HEATMAP_RECORD` the callback wrote below ``search``. Returns the
    figures written and notes on what could not be drawn."""
    out = Path(out_dir)
    written, notes = {}, []
    bands, stalled = bands_from_series(series)
    if bands:
        out.mkdir(parents=True, exist_ok=True)
        path = plot_bands(bands, out / CHANNEL_FIGURE_FILES["channel_bands"], stalled, source)
        if path is not None:
            written["channel_bands"] = path
    records = sorted(Path(search).rglob(HEATMAP_RECORD), key=lambda p: p.stat().st_mtime) if search else []
    records = [r for r in records if r.parent != out]
    if records:
        with np.load(records[-1]) as data:
            stalled_at = float(data["stalled"])
            out.mkdir(parents=True, exist_ok=True)
            path = plot_unit_heatmap(data["steps"], data["matrix"], str(data["layer"]),
                                     out / CHANNEL_FIGURE_FILES["channel_heatmap"], bool(data["theory_known"]),
                                     None if math.isnan(stalled_at) else stalled_at, str(data["why"]))
        if path is not None:
            written["channel_heatmap"] = path
    elif bands:
        notes.append(f"no {HEATMAP_RECORD} below {search}: the per-unit heatmap needs the per-unit values the "
                     "callback writes next to its figures (no logger holds them)")
    return written, notes


class _quiet:
    """Silence numpy's all-NaN-slice warnings for steps where a layer has no finite unit."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
