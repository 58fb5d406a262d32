"""The metrics builder: turns the stacked statistics of one measured step into the logged metric dict."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate, compress
from typing import NamedTuple

import numpy as np

from lightning_smd.lightning.namespace import rank_zero_warn
from torch import Tensor

from lightning_smd.core.channels import ChannelMetrics
from lightning_smd.core.equilibrium import EquilibriumTracker
from lightning_smd.core.estimates import RunningMean
from lightning_smd.core.state import SMDState
from lightning_smd.core.steps import Finished
from lightning_smd.report.summary import first_names
from lightning_smd.lightning.tracking import TrackedSet

__all__ = ["MetricsBuilder", "TensorKeys"]


class TensorKeys(NamedTuple):
    """The metric keys of one tensor (part of the public contract, see the README)."""

    angular_update: str
    angular_update_theory: str
    weight_norm: str
    weight_norm_theory: str
    unit_grad_sq: str


@dataclass
class _Layout:
    """The columns of one set of finished slices: names, groups, per-slice spans, the metric keys
    ([tensor][Δ_t, ‖w_t‖, Δ*, L, ‖w*‖], the order they are logged in)."""

    tracked: TrackedSet
    n: int
    names: list[str]
    groups: list[str]
    spans: list[tuple[int, int]]
    keys: list[str]


class MetricsBuilder:
    """Per measured step: Δ_t, ‖w_t‖, the running L and the theory lines per tensor, the Δ_t/Δ*
    aggregates, and equilibrium tracking (which it advances).

    ``state``'s running L (``unit_grad``), ``equilibrium`` and ``channels`` (the per-channel metrics,
    built from the unit columns of the statistics; ``None``: per-tensor metrics only) are updated
    here in place: they are the checkpointed state.
    """

    def __init__(self, state: SMDState) -> None:
        self.state = state
        self._key_cache: dict[str, TensorKeys] = {}
        self._layouts: dict[tuple, _Layout] = {}
        self._warned_not_finite = False

    @property
    def unit_grad(self) -> RunningMean:
        return self.state.unit_grad

    @property
    def equilibrium(self) -> EquilibriumTracker:
        return self.state.equilibrium

    @property
    def channels(self) -> ChannelMetrics | None:
        return self.state.channels

    def keys(self, name: str) -> TensorKeys:
        """The metric keys of one tensor, built once (shared by every record)."""
        keys = self._key_cache.get(name)
        if keys is None:
            keys = self._key_cache[name] = TensorKeys(*(f"smd/{kind}/{name}" for kind in TensorKeys._fields))
        return keys

    def build(self, stats: Tensor, finished: Finished, tracked: TrackedSet, step: int) -> dict[str, float]:
        """``stats``: the host ``[3, n + m]`` rows (Δ_t, ‖w_t‖, L sample) of ``finished``'s slices:
        ``n`` tensor columns, then ``m`` invariance-unit columns (see :meth:`StepMeasurer.after_step`).

        Whole-array work over the tensors (the running L and the equilibrium windows are arrays
        too); per tensor only the metric dict is built, from one key list precomputed per layout."""
        layout = self._layout(finished, tracked)
        n, names, groups = layout.n, layout.names, layout.groups
        values = stats.numpy()  # float32 (float64 if measured so): the unit columns stay in it
        delta, w_norm, sample = values[:, :n].astype(np.float64)
        finite = np.isfinite(delta) & np.isfinite(w_norm)
        # a sample from a step with NaN/inf weights or update is not evidence about L
        unit_grad = self.unit_grad.update_array(names, np.where(finite, sample, np.nan), step)
        # Δ* per tensor: the group's (Muon's depends on the matrix shape: cached pure function)
        star, coefficient = np.empty(n), np.empty(n)
        for s, group_theory, (a, b) in zip(finished.slices, finished.theories, layout.spans):
            if group_theory.family == "muon":
                star[a:b] = [math.nan if (v := group_theory.angular_update_for(p.shape)) is None else v for p in s.params]
            else:
                v = group_theory.angular_update
                star[a:b] = math.nan if v is None else v
            try:  # ‖w*‖² = c·√L (SGD family); None: no formula from L
                c = group_theory.equilibrium_norm_sq(1.0)
            except ValueError:  # η or λ not positive: no equilibrium
                c = None
            coefficient[a:b] = math.nan if c is None else c
        has_star = ~np.isnan(star)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios = np.where(has_star & (star != 0), delta / np.where(has_star & (star != 0), star, 1.0), np.nan)
            norm_theory = np.sqrt(coefficient * np.sqrt(np.where(unit_grad > 0, unit_grad, np.nan)))
        # NaN/inf weights or update: the running L (which skipped the sample) and ‖w*‖ would be
        # stale values that describe no step of this run: not logged
        logged = np.stack([np.ones(n, bool), np.ones(n, bool), has_star,
                           finite & np.isfinite(unit_grad), finite & np.isfinite(norm_theory)], axis=1)
        columns = np.stack([delta, w_norm, star, unit_grad, norm_theory], axis=1)
        mask = logged.ravel().tolist()
        metrics: dict[str, float] = dict(zip(compress(layout.keys, mask), compress(columns.ravel().tolist(), mask)))
        if not finite.all() and not self._warned_not_finite:
            self._warned_not_finite = True
            not_finite = [names[i] for i in np.flatnonzero(~finite).tolist()]
            rank_zero_warn(
                f"SMDCallback: step {finished.log_step}: Δ_t or ‖w_t‖ is not finite (NaN/inf) for "
                f"{first_names(not_finite)}: the weights or their update hold NaN/inf and no GradScaler "
                "skipped the step. Their running L and ‖w*‖ are neither updated nor logged until they are finite "
                "again. Check the loss, the learning rate, or train with a GradScaler (precision='16-mixed')."
            )
        finite_ratios = ratios[np.isfinite(ratios)]
        if finite_ratios.size:
            metrics["smd/angular_update_ratio/mean"] = math.fsum(finite_ratios.tolist()) / finite_ratios.size
            metrics["smd/angular_update_ratio/min"] = float(finite_ratios.min())
            metrics["smd/angular_update_ratio/max"] = float(finite_ratios.max())
        newly = self.equilibrium.update(finished.log_step, groups, names, ratios)
        if newly:
            group_of = dict(zip(names, groups))
            for name, reached in newly.items():
                stage = self.equilibrium.current_stage(group_of[name])
                metrics[f"smd/equilibrium_step/{name}"] = float(reached)
                metrics[f"smd/steps_to_equilibrium/measured/{name}"] = float(reached - stage.start_step)
        if finite_ratios.size:
            metrics["smd/equilibrium/fraction"] = self.equilibrium.fraction_reached(tracked.groups, tracked.names)
        if self.channels is not None and stats.shape[1] > n:
            self._channel_metrics(values[:, n:], finished, tracked, step, metrics)
        return metrics

    def _layout(self, finished: Finished, tracked: TrackedSet) -> _Layout:
        """The names, groups and metric keys of ``finished``'s columns, built once per set of slices."""
        key = tuple((id(s), s.start, len(s.params)) for s in finished.slices)
        cached = self._layouts.get(key)
        if cached is not None and cached.tracked is tracked:
            return cached
        index = [i for s in finished.slices for i in range(s.start, s.stop)]
        names = [tracked.names[i] for i in index]
        ends = list(accumulate(len(s.params) for s in finished.slices))
        keys = []
        for name in names:
            k = self.keys(name)
            keys.extend((k.angular_update, k.weight_norm, k.angular_update_theory, k.unit_grad_sq, k.weight_norm_theory))
        if len(self._layouts) > 16:
            self._layouts.clear()
        layout = self._layouts[key] = _Layout(tracked, len(names), names, [tracked.groups[i] for i in index],
                                              list(zip([0] + ends[:-1], ends)), keys)
        return layout

    def _channel_metrics(self, units: np.ndarray, finished: Finished, tracked: TrackedSet, step: int,
                         into: dict[str, float]) -> None:
        names, counts, theories = [], [], []
        for s, group_theory in zip(finished.slices, finished.theories):
            if s.units is not None:
                names.extend(tracked.names[s.start:s.stop])
                counts.extend(s.units)
                theories.extend([group_theory] * len(s.params))
        self.channels.build(units, names, counts, theories, step, finished.log_step, into=into)
