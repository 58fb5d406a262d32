"""Figures of the homogeneous-network measurements (matplotlib's object-oriented API, Agg canvas:
a user's pyplot state is never touched).

Each function takes ``label → data`` so one figure can compare runs (EWN against SWN):

* :func:`plot_margin`: normalized margin γ̄ (solid) and smoothed margin γ̃ (dashed) against step;
* :func:`plot_sparsity`: relative sparsity (fraction of units with ``r_u < t``) against step, one
  panel per threshold, one line per run and layer, and a last panel with the smallest ``r_u``;
* :func:`plot_pruning`: accuracy against the fraction of each layer's smallest units zeroed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_margin", "plot_pruning", "plot_sparsity", "series"]

Record = tuple[int, Mapping[str, float]]  # (step, metrics)


def _figure(size=(6.4, 3.6)) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=110, layout="constrained")


def series(history: Sequence[Record], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` over the records that hold it."""
    pts = [(s, float(m[key])) for s, m in history if key in m]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_margin(histories: Mapping[str, Sequence[Record]], path: str | Path, prefix: str = "homogeneous") -> Path | None:
    """γ̄ and γ̃ against step; ``None`` (nothing written) when no run has a margin."""
    fig = _figure()
    ax = fig.add_subplot()
    drawn = False
    for i, (label, history) in enumerate(histories.items()):
        color = f"C{i}"
        steps, values = series(history, f"{prefix}/normalized_margin")
        if steps:
            ax.plot(steps, values, color=color, marker=".", label=f"{label} normalized γ̄".strip())
            drawn = True
        steps, values = series(history, f"{prefix}/smoothed_margin")
        if steps:
            ax.plot(steps, values, color=color, ls="--", label=f"{label} smoothed γ̃".strip())
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("margin / ρ^L")
    ax.set_title("Normalized margin min_i q_i/ρ^L, smoothed margin (Lyu & Li)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sparsity(histories: Mapping[str, Sequence[Record]], path: str | Path, prefix: str = "homogeneous") -> Path | None:
    """Relative sparsity against step, one panel per threshold; ``None`` when nothing was logged."""
    head = f"{prefix}/relative_sparsity/"
    split = {k: k[len(head):].split("/", 1) for h in histories.values() for _, m in h for k in m if k.startswith(head)}
    if not split:
        return None
    thresholds = sorted({t for t, _ in split.values()}, key=lambda t: -float(t[3:]))
    min_head = f"{prefix}/min_relative_norm/"
    has_min = any(k.startswith(min_head) for h in histories.values() for _, m in h for k in m)
    panels = len(thresholds) + has_min
    fig = _figure((3.6 * panels, 3.4))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    if has_min:
        ax = axes[-1]
        for i, (label, history) in enumerate(histories.items()):
            layers = sorted({k[len(min_head):] for _, m in history for k in m if k.startswith(min_head)})
            for j, layer in enumerate(layers):
                steps, values = series(history, f"{min_head}{layer}")
                ax.plot(steps, values, color=f"C{i}", ls=("-", "--", ":", "-.")[j % 4], label=f"{label} {layer}".strip())
        ax.set_title("smallest r_u = min n_u / max n_u")
        ax.set_xlabel("step")
        ax.set_yscale("log")  # r_u decays geometrically under EWN's asymptotic relative sparsity
        low = min((v for h in histories.values() for _, m in h for k, v in m.items()
                   if k.startswith(min_head) and v > 0), default=0.1)
        ax.set_ylim(min(0.05, low / 2), 1.5)
        for t in (1e-1, 1e-2, 1e-3):
            if t >= low / 2:
                ax.axhline(t, color="0.6", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    for ax, t in zip(axes, thresholds):
        for i, (label, history) in enumerate(histories.items()):
            layers = sorted({split[k][1] for _, m in history for k in m if k in split and split[k][0] == t})
            for j, layer in enumerate(layers):
                steps, values = series(history, f"{head}{t}/{layer}")
                ax.plot(steps, values, color=f"C{i}", ls=("-", "--", ":", "-.")[j % 4], label=f"{label} {layer}".strip())
        ax.set_title(f"fraction of units with r_u < {t[3:]}")
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative sparsity")
    axes[-1].legend(fontsize=7)
    return _save(fig, path)


def plot_pruning(curves: Mapping[str, Mapping[float, float]], path: str | Path) -> Path | None:
    """Accuracy against the fraction of units pruned (smallest ``n_u`` first)."""
    if not curves:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for i, (label, curve) in enumerate(curves.items()):
        fractions = sorted(curve)
        ax.plot([100 * p for p in fractions], [100 * curve[p] for p in fractions], marker="o", color=f"C{i}", label=label)
    ax.set_xlabel("% of each hidden layer's units zeroed (smallest n_u first)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Pruning curve")
    ax.grid(alpha=0.3)
    if any(curves):
        ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
