"""Pictures of per-channel spherical motion: per-layer quantile bands and a units × steps heatmap of Δ_t/Δ*, and the per-layer histograms sent to TensorBoard and W&B.

Everything is drawn from :class:`~lightning_smd.channels.ChannelMetrics` (its thinned per-unit
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

__all__ = ["CHANNEL_FIGURE_FILES", "HIST_PREFIX", "default_heatmap_layer", "log_histograms",
           "plot_channel_bands", "plot_channel_heatmap", "save_channel_figures"]

HIST_PREFIX = "smd/channel_hist"
CHANNEL_FIGURE_FILES = {"channel_bands": "smd_channel_bands.png", "channel_heatmap": "smd_channel_heatmap.png"}


def _tensorboard_writers(trainer: Any) -> list[Any]:
    if not getattr(trainer, "is_global_zero", True):
        return []
    from lightning_smd.lightning.namespace import is_kind

    return [lg.experiment for lg in getattr(trainer, "loggers", []) if is_kind(lg, "TensorBoardLogger")]


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
    if wandb_extras._wandb_loggers(trainer):
        import wandb

        wandb_extras._log(trainer, lambda: {k: wandb.Histogram(v) for k, v in values.items()}, step)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_channel_bands(channels: ChannelMetrics, path: str | Path) -> Path | None:
    """Per layer, quantile bands of Δ_t/Δ* over units against the step; ``None`` without data."""
    layers = [n for n, h in channels.history.items() if h.columns and channels.has_theory.get(n)]
    plt = _pyplot()
    if not layers or plt is None:
        return None
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, layers):
        history = channels.history[name]
        matrix = history.matrix()
        steps = np.asarray(history.steps)
        with np.errstate(invalid="ignore"), _quiet():
            q = np.nanpercentile(np.where(matrix > 0, matrix, np.nan), [5, 25, 50, 75, 95], axis=0)
        ax.fill_between(steps, q[0], q[4], alpha=0.2, color="C0", label="5–95 %")
        ax.fill_between(steps, q[1], q[3], alpha=0.35, color="C0", label="25–75 %")
        ax.plot(steps, q[2], color="C0", lw=1.2, label="median")
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="Δ*")
        ax.axhline(STALL_RATIO, color="C3", lw=0.8, ls=":", label="stalled")
        stalled = channels.stalled.get(name)
        title = name if stalled is None else f"{name} (stalled {stalled:.0%})"
        ax.set_title(title, fontsize=7)
        ax.set_yscale("log")
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=5, loc="lower right")
    fig.supxlabel("step", fontsize=8)
    fig.supylabel("Δ_t / Δ* per unit", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_heatmap_layer(channels: ChannelMetrics) -> str | None:
    """The layer with the most stalled units; among equals, the widest p95/p05 spread of Δ_t/Δ*."""
    def spread(name: str) -> float:
        latest = channels.latest.get(name)
        finite = latest[np.isfinite(latest) & (latest > 0)] if latest is not None else np.zeros(0)
        return float(np.percentile(finite, 95) / np.percentile(finite, 5)) if finite.size else 0.0

    names = [n for n, h in channels.history.items() if h.columns]
    if not names:
        return None
    return max(names, key=lambda n: (channels.stalled.get(n, 0.0), spread(n)))


def plot_channel_heatmap(channels: ChannelMetrics, path: str | Path, layer: str | None = None) -> Path | None:
    """Δ_t/Δ* of every unit of ``layer`` (default :func:`default_heatmap_layer`) over steps."""
    layer = layer or default_heatmap_layer(channels)
    plt = _pyplot()
    if layer is None or plt is None or layer not in channels.history or not channels.history[layer].columns:
        return None
    from matplotlib.colors import TwoSlopeNorm

    history = channels.history[layer]
    matrix = history.matrix().astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logged = np.log10(np.clip(matrix, 1e-3, None))
    theory_known = channels.has_theory.get(layer, False)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = history.steps
    extent = (steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1, matrix.shape[0] - 0.5, -0.5)
    if theory_known:
        norm = TwoSlopeNorm(vcenter=0.0, vmin=min(-1.0, np.nanmin(logged)), vmax=max(1.0, np.nanmax(logged)))
        image = ax.imshow(logged, aspect="auto", cmap="RdBu_r", norm=norm, extent=extent, interpolation="nearest")
    else:
        image = ax.imshow(logged, aspect="auto", cmap="viridis", extent=extent, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("log10(Δ_t / Δ*)" if theory_known else "log10 Δ_t (rad)")
    ax.set_xlabel("step")
    ax.set_ylabel("unit")
    stalled = channels.stalled.get(layer)
    ax.set_title(f"{layer}: per-unit angular update" + (f" (stalled {stalled:.0%})" if stalled is not None else ""),
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_channel_figures(channels: ChannelMetrics | None, out_dir: str | Path, layer: str | None = None) -> dict[str, Path]:
    """Write both per-channel figures into ``out_dir``; ``{name: path}`` of those with data."""
    if channels is None or not channels.history:
        return {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, make in (("channel_bands", lambda p: plot_channel_bands(channels, p)),
                       ("channel_heatmap", lambda p: plot_channel_heatmap(channels, p, layer))):
        path = make(out / CHANNEL_FIGURE_FILES[name])
        if path is not None:
            written[name] = path
    return written


class _quiet:
    """Silence numpy's all-NaN-slice warnings for steps where a layer has no finite unit."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
