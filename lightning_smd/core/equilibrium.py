"""Equilibrium tracking: when Δ_t/Δ* settles after each learning-rate stage, against Corollary 3.1."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["EquilibriumTracker", "Stage"]

#: a window is judged by the means of this many consecutive parts of it (noise averages out, a
#: transient does not)
SUBWINDOWS = 4


@dataclass
class Stage:
    """One learning-rate stage of one param group."""

    group: str
    start_step: int
    predicted_steps: int | None  # Corollary 3.1, without rescale (None for the first stage / no formula)
    rescaled: bool = False
    reached: dict[str, int] = field(default_factory=dict)  # tensor -> first step of its stable window
    warmup_until: int | None = None  # last step of an LR warm-up inside the stage: equilibrium is judged after it

    def as_dict(self) -> dict[str, Any]:
        return {"group": self.group, "start_step": self.start_step, "predicted_steps": self.predicted_steps,
                "rescaled": self.rescaled, "reached": dict(self.reached), "warmup_until": self.warmup_until}


class EquilibriumTracker:
    """Per tensor, the first step from which every measured Δ_t/Δ* over a full window of ``window``
    optimizer steps stays within ``tolerance`` of 1 ("equilibrium reached"), restarted at every LR
    stage of its group; the reported step is the window's first measured step.

    Single measured Δ_t are noisy (a few percent on large tensors, tens of percent on small ones):
    a tensor whose noise exceeds the tolerance is never declared at equilibrium (widen
    ``EquilibriumOptions.tolerance`` for it) rather than declared so by an average over a transient.
    """

    def __init__(self, tolerance: float = 0.1, window: int = 200) -> None:
        if not 0 < tolerance < 1:
            raise ValueError(f"EquilibriumTracker(tolerance=...) (EquilibriumOptions.tolerance) must be in (0, 1), "
                             f"got {tolerance!r}")
        if window < 1:
            raise ValueError(f"EquilibriumTracker(window=...) (EquilibriumOptions.window) must be >= 1, got {window!r}")
        self.tolerance = tolerance
        self.window = window
        self.stages: list[Stage] = []
        self._current: dict[str, Stage] = {}  # group -> its current stage
        self._points: dict[str, deque[tuple[int, float]]] = {}
        self._sums: dict[str, float] = {}  # running sum of each window's ratios

    def start_stage(self, group: str, step: int, predicted_steps: int | None, rescaled: bool, names: Sequence[str]) -> None:
        stage = Stage(group, step, predicted_steps, rescaled)
        self.stages.append(stage)
        self._current[group] = stage
        for name in names:
            self._points.pop(name, None)
            self._sums.pop(name, None)

    def restart(self, group: str, step: int, names: Sequence[str]) -> None:
        """An LR warm-up step: the group stays in its stage, measured afresh from ``step`` (the ramp
        and the plateau it climbs to are one stage, see :mod:`lightning_smd.core.plan.warmup`)."""
        stage = self._current.get(group)
        if stage is None:
            stage = self._current[group] = Stage(group, 0, None)
            self.stages.append(stage)
        stage.warmup_until = step
        stage.reached.clear()
        for name in names:
            self._points.pop(name, None)
            self._sums.pop(name, None)

    def update(self, step: int, groups: Sequence[str], names: Sequence[str], ratios: Sequence[float]) -> dict[str, int]:
        """Add one measured ratio per tensor; return the tensors that just reached equilibrium."""
        newly: dict[str, int] = {}
        for group, name, ratio in zip(groups, names, ratios):
            stage = self._current.get(group)
            if stage is None:
                stage = Stage(group, 0, None)
                self.stages.append(stage)
                self._current[group] = stage
            if name in stage.reached or not math.isfinite(ratio):
                continue
            points = self._points.setdefault(name, deque())
            points.append((step, ratio))
            total = self._sums.get(name, 0.0) + ratio
            while points and points[0][0] <= step - self.window:
                total -= points.popleft()[1]
            self._sums[name] = total
            start = max(stage.start_step, stage.warmup_until or 0)
            if self._full_window_inside(points, step, start):
                stage.reached[name] = newly[name] = points[0][0]
        return newly

    def _full_window_inside(self, points: deque[tuple[int, float]], step: int, start: int) -> bool:
        """A verdict needs a full window of measured points inside the tolerance: the window's
        ``window`` steps lie in the stage, measured points cover it from its first step (the
        oldest is no later than one measurement interval after it: no verdict from a window
        that began before measuring did, e.g. during detection; no hole over two measurement
        intervals inside it), and the mean of each of its :data:`SUBWINDOWS` consecutive parts is
        within ``tolerance`` of 1. The mean of the whole window would let a transient far from 1
        (9.7 → 0.01 → 3.8) average out and date equilibrium before it ended; every single point
        within the tolerance would never hold for the noisy Δ_t of a small tensor or batch."""
        if step - start + 1 < self.window or not points or points[0][0] < start:
            return False
        gaps = [b[0] - a[0] for a, b in zip(points, list(points)[1:])] or [1]
        interval = max(gaps)
        if interval > 2 * min(gaps) or points[0][0] > step - self.window + interval:
            return False  # a hole in the measurements (one skipped step is allowed), or a late start
        ratios = [r for _, r in points]
        parts = min(SUBWINDOWS, len(ratios))
        bounds = [round(i * len(ratios) / parts) for i in range(parts + 1)]
        return all(abs(sum(ratios[a:b]) / (b - a) - 1.0) <= self.tolerance for a, b in zip(bounds, bounds[1:]))

    def window_mean(self, name: str) -> tuple[float, int] | None:
        """``(mean, count)``: the mean of Δ_t/Δ* over the tensor's current window (the last
        ``window`` optimizer steps of its stage, ``count`` measured points), or ``None`` before
        its first point in the stage. Once the tensor reached equilibrium in the stage, the window
        is the one that reached it (no points are added after that)."""
        points = self._points.get(name)
        if not points:
            return None
        return self._sums.get(name, 0.0) / len(points), len(points)

    def current_stage(self, group: str) -> Stage | None:
        return self._current.get(group)

    def fraction_reached(self, groups: Sequence[str], names: Sequence[str]) -> float:
        if not names:
            return math.nan
        hits = sum(1 for g, n in zip(groups, names) if (s := self._current.get(g)) is not None and n in s.reached)
        return hits / len(names)

    def summary(self) -> str:
        """A table: each stage, its predicted and measured steps to equilibrium.

        A header line explains the columns. "reached at" is the median over the stage's tensors
        of the step logged as ``smd/equilibrium_step/{name}`` (an absolute optimizer step), with
        the steps since the stage start in brackets, the number to compare with "predicted".
        """
        lines = [
            "SMD: equilibrium per learning-rate stage",
            f"  (from step: first optimizer step of the stage; rescaled: weights rescaled at its start; "
            f"predicted: steps to equilibrium by Corollary 3.1, '-' = no formula or first stage; "
            f"reached at: median step from which every measured Δ_t/Δ* of a full {self.window}-step window is within "
            f"±{self.tolerance:g} of 1 (smd/equilibrium_step), steps after the stage start in brackets; "
            "tensors: how many reached it)",
            f"{'group':<8}{'from step':>10}{'rescaled':>10}{'predicted':>11}{'reached at (median)':>22}{'tensors':>9}",
        ]
        for s in self.stages:
            steps = sorted(s.reached.values())
            median = f"{steps[len(steps) // 2]} (+{steps[len(steps) // 2] - s.start_step})" if steps else "-"
            predicted = "-" if s.predicted_steps is None else str(s.predicted_steps)
            lines.append(f"{s.group:<8}{s.start_step:>10}{str(s.rescaled):>10}{predicted:>11}{median:>22}"
                         f"{len(s.reached):>9}")
        for s in self.stages:
            if s.warmup_until is not None:
                lines.append(f"  group {s.group}: LR warm-up until step {s.warmup_until}, one stage with the plateau "
                             "it climbs to; equilibrium is judged from its end")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {
            "stages": [s.as_dict() for s in self.stages],
            "current": {g: self.stages.index(s) for g, s in self._current.items()},
            "points": {n: list(p) for n, p in self._points.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stages = [Stage(**s) for s in state["stages"]]
        self._current = {g: self.stages[i] for g, i in state["current"].items()}
        self._points = {n: deque((int(s), float(r)) for s, r in p) for n, p in state["points"].items()}
        self._sums = {n: math.fsum(r for _, r in p) for n, p in self._points.items()}
