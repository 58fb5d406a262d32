"""One measured step, labelled: the result the state and every output read.

The recorder hands over a round of measured steps as a device ``[3, n + m]`` tensor over its
slices (:class:`~lightning_smd.core.steps.Finished`); on the host it becomes one
:class:`StepResult`: per tensor column its name, group, group theory, Δ*, Δ_t, ‖w_t‖ and L sample,
and the invariance-unit block with its labels. :class:`~lightning_smd.core.metrics.MetricsBuilder`
(metrics, running L, equilibrium, per-channel metrics) and
:meth:`~lightning_smd.core.schedule.ScheduleWatcher.observe` (ū²) read it; nothing else walks
the columns back to names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_smd.core import theory
from lightning_smd.core.steps import Finished

__all__ = ["StepResult"]


@dataclass
class StepResult:
    """A measured step (a round: the k-th step of every optimizer), labelled.

    Per tensor column ``i``: ``names[i]``, ``groups[i]`` (the param group's label), ``theories[i]``
    (its group's :class:`~lightning_smd.core.theory.GroupTheory` at the step), ``delta_star[i]`` (Δ*,
    per shape for Muon), ``delta[i]`` (Δ_t), ``w_norm[i]`` (‖w_t‖), ``unit_grad_sample[i]`` (the L
    sample; NaN where none was taken or Δ_t/‖w_t‖ is not finite). ``units``: the host ``[3, m]``
    block of the per-unit columns (Δ, ‖w‖, L per unit) of the tensors ``unit_names`` (with
    ``unit_counts`` units each, of ``unit_theories``), or ``None`` on a per-tensor step.
    """

    log_step: int
    step: int
    names: list[str]
    groups: list[str]
    theories: list[theory.GroupTheory]
    delta_star: list[float | None]
    delta: list[float]
    w_norm: list[float]
    unit_grad_sample: list[float]
    units: Any = None
    unit_names: list[str] | None = None
    unit_counts: list[int] | None = None
    unit_theories: list[theory.GroupTheory] | None = None

    @classmethod
    def label(cls, stats: Tensor, finished: Finished, tracked: Any) -> StepResult:
        """``stats``: the host ``[3, n + m]`` rows of ``finished`` (:meth:`Finished.to_host`);
        ``tracked``: the :class:`~lightning_smd.core.tracking.TrackedSet` that labels its columns."""
        n = sum(len(s.params) for s in finished.slices)
        stats = stats.double()
        delta, w_norm, sample = stats[:, :n].tolist()
        names: list[str] = []
        groups: list[str] = []
        theories: list[theory.GroupTheory] = []
        delta_star: list[float | None] = []
        unit_names: list[str] = []
        unit_counts: list[int] = []
        unit_theories: list[theory.GroupTheory] = []
        for s, group_theory in zip(finished.slices, finished.theories):
            names.extend(tracked.names[s.start:s.stop])
            groups.extend(tracked.groups[s.start:s.stop])
            theories.extend([group_theory] * len(s.params))
            if group_theory.family == "muon":  # Muon's Δ* depends on the matrix shape (cached pure function)
                delta_star.extend(group_theory.angular_update_for(p.shape) for p in s.params)
            else:
                delta_star.extend([group_theory.angular_update] * len(s.params))
            if s.units is not None:
                unit_names.extend(tracked.names[s.start:s.stop])
                unit_counts.extend(s.units)
                unit_theories.extend([group_theory] * len(s.params))
        # a sample from a step with NaN/inf weights or update is not evidence about L
        sample = [u if math.isfinite(d) and math.isfinite(w) else math.nan for u, d, w in zip(sample, delta, w_norm)]
        with_units = stats.shape[1] > n
        return cls(finished.log_step, finished.step, names, groups, theories, delta_star, delta, w_norm, sample,
                   units=stats[:, n:].numpy() if with_units else None,
                   unit_names=unit_names if with_units else None, unit_counts=unit_counts if with_units else None,
                   unit_theories=unit_theories if with_units else None)
