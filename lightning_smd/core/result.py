"""One measured step, labelled: the result the state and every output read.

The recorder hands over a round of measured steps as a device ``[3, n + m]`` tensor over its
slices (:class:`~lightning_smd.core.steps.Finished`); on the host it becomes one
:class:`StepResult`: per tensor column its name, group, Δ*, Δ_t, ‖w_t‖ and L sample (arrays over
the columns), the group theory of each slice, and the invariance-unit block with its labels.
:class:`~lightning_smd.core.metrics.MetricsBuilder` (metrics, running L, equilibrium, per-channel
metrics) and :meth:`~lightning_smd.core.schedule.ScheduleWatcher.observe` (ū²) read it; nothing
else walks the columns back to names. The labels are built once per set of slices
(:class:`Labeller`), so a step of thousands of tensors is a few whole-array operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import numpy as np
from torch import Tensor

from lightning_smd.core import theory
from lightning_smd.core.steps import Finished

__all__ = ["Labeller", "StepResult"]


@dataclass
class _Layout:
    """The labels of one set of finished slices (shared by every step measured with them)."""

    tracked: Any
    names: list[str]
    groups: list[str]
    spans: list[tuple[int, int]]
    unit_names: list[str]
    unit_counts: list[int]


@dataclass
class StepResult:
    """A measured step (a round: the k-th step of every optimizer), labelled.

    Per tensor column ``i``: ``names[i]``, ``groups[i]`` (the param group's label), ``delta_star[i]``
    (Δ*, per shape for Muon; NaN where the theory has none), ``delta[i]`` (Δ_t), ``w_norm[i]``
    (‖w_t‖), ``unit_grad_sample[i]`` (the L sample; NaN where none was taken or Δ_t/‖w_t‖ is not
    finite), as float64 arrays. ``spans[k]``/``slice_theories[k]``: the columns of the k-th slice
    and its group's :class:`~lightning_smd.core.theory.GroupTheory` at the step. ``units``: the host
    ``[3, m]`` block of the per-unit columns (Δ, ‖w‖, L per unit) of the tensors ``unit_names`` (with
    ``unit_counts`` units each, of ``unit_theories``, with Δ* ``unit_delta_star``), or ``None`` on a
    per-tensor step.
    """

    log_step: int
    step: int
    names: list[str]
    groups: list[str]
    spans: list[tuple[int, int]]
    slice_theories: list[theory.GroupTheory]
    delta_star: np.ndarray
    delta: np.ndarray
    w_norm: np.ndarray
    unit_grad_sample: np.ndarray
    units: Any = None
    unit_names: list[str] | None = None
    unit_counts: list[int] | None = None
    unit_theories: list[theory.GroupTheory] | None = None
    unit_delta_star: np.ndarray | None = None


class Labeller:
    """Labels the statistics of measured steps (:meth:`label`), with the labels of each set of
    slices built once."""

    def __init__(self) -> None:
        self._layouts: dict[tuple, _Layout] = {}
        self._tracked: Any = None

    def _layout(self, finished: Finished, tracked: Any) -> _Layout:
        if tracked is not self._tracked:  # a new tracked set (resume, added tensors): its own slices
            self._layouts.clear()
            self._tracked = tracked
        key = tuple((id(s), s.start, len(s.params), s.units is not None) for s in finished.slices)
        cached = self._layouts.get(key)
        if cached is not None:
            return cached
        names: list[str] = []
        groups: list[str] = []
        unit_names: list[str] = []
        unit_counts: list[int] = []
        for s in finished.slices:
            names.extend(tracked.names[s.start:s.stop])
            groups.extend(tracked.groups[s.start:s.stop])
            if s.units is not None:
                unit_names.extend(tracked.names[s.start:s.stop])
                unit_counts.extend(s.units)
        ends = list(accumulate(len(s.params) for s in finished.slices))
        if len(self._layouts) > 16:
            self._layouts.clear()
        layout = self._layouts[key] = _Layout(tracked, names, groups, list(zip([0] + ends[:-1], ends)),
                                              unit_names, unit_counts)
        return layout

    def label(self, stats: Tensor, finished: Finished, tracked: Any) -> StepResult:
        """``stats``: the host ``[3, n + m]`` rows of ``finished`` (:meth:`Finished.to_host`);
        ``tracked``: the :class:`~lightning_smd.core.tracking.TrackedSet` that labels its columns."""
        layout = self._layout(finished, tracked)
        n = len(layout.names)
        values = stats.numpy()  # float32 (float64 if measured so): the unit columns stay in it
        delta, w_norm, sample = values[:, :n].astype(np.float64)
        star = np.empty(n)
        for s, group_theory, (a, b) in zip(finished.slices, finished.theories, layout.spans):
            if group_theory.family == "muon":  # Muon's Δ* depends on the matrix shape (cached pure function)
                star[a:b] = [math.nan if (v := group_theory.angular_update_for(p.shape)) is None else v for p in s.params]
            else:
                v = group_theory.angular_update
                star[a:b] = math.nan if v is None else v
        # a sample from a step with NaN/inf weights or update is not evidence about L
        sample = np.where(np.isfinite(delta) & np.isfinite(w_norm), sample, np.nan)
        with_units = values.shape[1] > n
        unit_theories = unit_star = None
        if with_units:
            unit_theories = [t for s, t in zip(finished.slices, finished.theories) if s.units is not None
                             for _ in range(len(s.params))]
            unit_star = np.concatenate([star[a:b] for s, (a, b) in zip(finished.slices, layout.spans)
                                        if s.units is not None] or [np.empty(0)])
        return StepResult(finished.log_step, finished.step, layout.names, layout.groups, layout.spans,
                          list(finished.theories), star, delta, w_norm, sample,
                          units=values[:, n:] if with_units else None,
                          unit_names=layout.unit_names if with_units else None,
                          unit_counts=layout.unit_counts if with_units else None,
                          unit_theories=unit_theories, unit_delta_star=unit_star)
