"""Equilibrium tracking: when Δ_t/Δ* settles after each learning-rate stage, against Corollary 3.1."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from lightning_smd.core.rows import NameRows

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

    Array-backed: each tensor's window is a row of one ring buffer of (step, ratio) points over all
    tensors, so a measured step of thousands of tensors is a few whole-array operations.
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
        self._clear_points()

    def _clear_points(self) -> None:
        self._index = NameRows()  # name → its row of the ring buffer
        self._steps = np.zeros((0, 8), dtype=np.int64)  # [rows, capacity]: the window's points, oldest at head
        self._ratios = np.zeros((0, 8))
        self._head = np.zeros(0, dtype=np.int64)
        self._len = np.zeros(0, dtype=np.int64)
        self._groups_of: tuple[tuple[str, ...], np.ndarray, list[str]] | None = None

    def _rows(self, names: Sequence[str]) -> np.ndarray:
        index, k = self._index.rows(names)
        if k:
            cap = self._steps.shape[1]
            self._steps = np.concatenate([self._steps, np.zeros((k, cap), dtype=np.int64)])
            self._ratios = np.concatenate([self._ratios, np.zeros((k, cap))])
            self._head = np.concatenate([self._head, np.zeros(k, dtype=np.int64)])
            self._len = np.concatenate([self._len, np.zeros(k, dtype=np.int64)])
        return index

    def _group_ids(self, groups: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        key = tuple(groups)
        cached = self._groups_of
        if cached is None or cached[0] != key:
            unique = list(dict.fromkeys(key))
            where = {g: i for i, g in enumerate(unique)}
            cached = self._groups_of = (key, np.fromiter((where[g] for g in key), dtype=np.int64, count=len(key)), unique)
        return cached[1], cached[2]

    def _forget(self, names: Sequence[str]) -> None:
        rows = [self._index.row[n] for n in names if n in self._index.row]
        self._len[rows] = 0
        self._head[rows] = 0

    def _ordered(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, ratios)`` of ``rows`` as ``[k, capacity]``, oldest point first."""
        cap = self._steps.shape[1]
        slots = (self._head[rows, None] + np.arange(cap)) % cap
        return self._steps[rows[:, None], slots], self._ratios[rows[:, None], slots]

    def _grow(self) -> None:
        """Double the ring's capacity (points laid out from slot 0)."""
        rows = np.arange(len(self._index))
        steps, ratios = self._ordered(rows)
        cap = self._steps.shape[1]
        self._steps = np.concatenate([steps, np.zeros_like(steps)], axis=1)
        self._ratios = np.concatenate([ratios, np.zeros_like(ratios)], axis=1)
        self._head = np.zeros(len(rows), dtype=np.int64)
        assert self._steps.shape[1] == 2 * cap

    def start_stage(self, group: str, step: int, predicted_steps: int | None, rescaled: bool, names: Sequence[str]) -> None:
        stage = Stage(group, step, predicted_steps, rescaled)
        self.stages.append(stage)
        self._current[group] = stage
        self._forget(names)

    def restart(self, group: str, step: int, names: Sequence[str]) -> None:
        """An LR warm-up step: the group stays in its stage, measured afresh from ``step`` (the ramp
        and the plateau it climbs to are one stage, see :mod:`lightning_smd.core.plan.warmup`)."""
        stage = self._current.get(group)
        if stage is None:
            stage = self._current[group] = Stage(group, 0, None)
            self.stages.append(stage)
        stage.warmup_until = step
        stage.reached.clear()
        self._forget(names)

    def update(self, step: int, groups: Sequence[str], names: Sequence[str], ratios: Sequence[float]) -> dict[str, int]:
        """Add one measured ratio per tensor (``names`` distinct); return the tensors that just
        reached equilibrium."""
        index = self._rows(names)
        group_id, unique = self._group_ids(groups)
        stages = []
        for group in unique:
            stage = self._current.get(group)
            if stage is None:
                stage = self._current[group] = Stage(group, 0, None)
                self.stages.append(stage)
            stages.append(stage)
        ratios = np.asarray(ratios, dtype=np.float64)
        add = np.isfinite(ratios)
        for g, stage in enumerate(stages):
            if stage.reached:  # no points are added once a tensor reached equilibrium in the stage
                members = np.flatnonzero(group_id == g)
                add[members[[names[i] in stage.reached for i in members.tolist()]]] = False
        picked = np.flatnonzero(add)
        if not picked.size:
            return {}
        rows = index[picked]
        if int(self._len[rows].max()) >= self._steps.shape[1]:
            self._grow()
        cap = self._steps.shape[1]
        slot = (self._head[rows] + self._len[rows]) % cap
        self._steps[rows, slot] = step
        self._ratios[rows, slot] = ratios[picked]
        self._len[rows] += 1
        # drop the points that left the window (the oldest first: steps increase along a row)
        ordered_steps, ordered_ratios = self._ordered(rows)
        filled = np.arange(cap) < self._len[rows, None]
        old = (filled & (ordered_steps <= step - self.window)).sum(axis=1)
        self._head[rows] = (self._head[rows] + old) % cap
        self._len[rows] -= old
        # a verdict needs the window's steps inside the stage (after any warm-up)
        start_of = np.array([max(s.start_step, s.warmup_until or 0) for s in stages], dtype=np.int64)
        start = start_of[group_id[picked]]
        judged = np.flatnonzero(step - start + 1 >= self.window)
        if not judged.size:
            return {}
        shift = old[judged]
        count = self._len[rows[judged]]
        # the rows after the drop: shift each row left by the points dropped
        positions = np.minimum(shift[:, None] + np.arange(cap), cap - 1)
        steps_now = np.take_along_axis(ordered_steps[judged], positions, axis=1)
        ratios_now = np.take_along_axis(ordered_ratios[judged], positions, axis=1)
        ok = self._inside(steps_now, ratios_now, count, step, start[judged])
        newly: dict[str, int] = {}
        for j in np.flatnonzero(ok).tolist():
            i = int(picked[judged[j]])
            stage = stages[group_id[i]]
            stage.reached[names[i]] = newly[names[i]] = int(steps_now[j, 0])
        return newly

    def _inside(self, steps: np.ndarray, ratios: np.ndarray, count: np.ndarray, step: int, start: np.ndarray) -> np.ndarray:
        """Per row (points oldest first, ``count`` of them): a full window of measured points inside
        the tolerance. The window's ``window`` steps lie in the stage, measured points cover it from
        its first step (the oldest is no later than one measurement interval after it: no verdict
        from a window that began before measuring did, e.g. during detection; no hole over two
        measurement intervals inside it), and the mean of each of its :data:`SUBWINDOWS`
        consecutive parts is within ``tolerance`` of 1. The mean of the whole window would let a
        transient far from 1 (9.7 → 0.01 → 3.8) average out and date equilibrium before it ended;
        every single point within the tolerance would never hold for the noisy Δ_t of a small
        tensor or batch."""
        k, cap = steps.shape
        column = np.arange(cap)
        first = steps[:, 0]
        gaps = np.diff(steps, axis=1)
        pair = column[None, :-1] + 1 < count[:, None]
        single = count <= 1
        interval = np.where(single, 1, np.where(pair, gaps, np.iinfo(np.int64).min).max(axis=1, initial=np.iinfo(np.int64).min))
        smallest = np.where(single, 1, np.where(pair, gaps, np.iinfo(np.int64).max).min(axis=1, initial=np.iinfo(np.int64).max))
        ok = (count > 0) & (first >= start) & (interval <= 2 * smallest) & (first <= step - self.window + interval)
        parts = np.minimum(SUBWINDOWS, np.maximum(count, 1))
        for p in range(SUBWINDOWS):
            lo = np.rint(p * count / parts).astype(np.int64)
            hi = np.rint((p + 1) * count / parts).astype(np.int64)
            used = p < parts
            inside = (column >= lo[:, None]) & (column < hi[:, None])
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(inside, ratios, 0.0).sum(axis=1) / (hi - lo)
            ok &= ~used | (np.abs(mean - 1.0) <= self.tolerance)
        return ok

    def window_mean(self, name: str) -> tuple[float, int] | None:
        """``(mean, count)``: the mean of Δ_t/Δ* over the tensor's current window (the last
        ``window`` optimizer steps of its stage, ``count`` measured points), or ``None`` before
        its first point in the stage. Once the tensor reached equilibrium in the stage, the window
        is the one that reached it (no points are added after that)."""
        points = self._points_of(name)
        if not points:
            return None
        return math.fsum(r for _, r in points) / len(points), len(points)

    def _points_of(self, name: str) -> list[tuple[int, float]]:
        row = self._index.row.get(name)
        if row is None or not self._len[row]:
            return []
        steps, ratios = self._ordered(np.array([row]))
        n = int(self._len[row])
        return list(zip(steps[0, :n].tolist(), ratios[0, :n].tolist()))

    def current_stage(self, group: str) -> Stage | None:
        return self._current.get(group)

    def fraction_reached(self, groups: Sequence[str], names: Sequence[str]) -> float:
        if not names:
            return math.nan
        group_id, unique = self._group_ids(groups)
        hits = 0
        for g, group in enumerate(unique):
            stage = self._current.get(group)
            if stage is not None and stage.reached:
                hits += sum(names[i] in stage.reached for i in np.flatnonzero(group_id == g).tolist())
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
            "points": {n: p for n in self._index.names if (p := self._points_of(n))},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stages = [Stage(**s) for s in state["stages"]]
        self._current = {g: self.stages[i] for g, i in state["current"].items()}
        self._clear_points()
        points = {n: [(int(s), float(r)) for s, r in p] for n, p in state["points"].items() if p}
        if not points:
            return
        rows = self._rows(list(points))
        while max(map(len, points.values())) > self._steps.shape[1]:
            self._grow()
        for row, p in zip(rows.tolist(), points.values()):
            self._steps[row, :len(p)] = [s for s, _ in p]
            self._ratios[row, :len(p)] = [r for _, r in p]
            self._len[row] = len(p)
