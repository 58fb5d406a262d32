"""The metrics builder: turns one labelled measured step into the logged metric dict."""

from __future__ import annotations

import math
from itertools import compress
from typing import NamedTuple

import numpy as np

from lightning_smd.core.messages import rank_zero_warn
from lightning_smd.core.result import StepResult
from lightning_smd.core.state import SMDState
from lightning_smd.report.summary import first_names

__all__ = ["MetricsBuilder", "TensorKeys"]


class TensorKeys(NamedTuple):
    """The metric keys of one tensor (part of the public contract, see the README)."""

    angular_update: str
    angular_update_theory: str
    weight_norm: str
    weight_norm_theory: str
    unit_grad_sq: str


class MetricsBuilder:
    """Per measured step: Δ_t, ‖w_t‖, the running L and the theory lines per tensor, the Δ_t/Δ*
    aggregates, and equilibrium tracking (which it advances).

    ``state``'s running L (``unit_grad``), ``equilibrium`` and ``channels`` (the per-channel metrics,
    built from the unit columns of the statistics; ``None``: per-tensor metrics only) are updated
    here in place: they are the checkpointed state.
    """

    def __init__(self, state: SMDState, owner: str = "SMDCallback") -> None:
        self.owner = owner  # the user's entry point, named in warnings
        self.state = state
        self._key_cache: dict[str, TensorKeys] = {}
        # per list of column names (one per set of slices, see result.Labeller): the logged keys,
        # [tensor][Δ_t, ‖w_t‖, Δ*, L, ‖w*‖] in the order they are logged
        self._key_lists: dict[int, tuple[list[str], list[str]]] = {}
        self._warned_not_finite = False

    def keys(self, name: str) -> TensorKeys:
        """The metric keys of one tensor, built once (shared by every record)."""
        keys = self._key_cache.get(name)
        if keys is None:
            keys = self._key_cache[name] = TensorKeys(*(f"smd/{kind}/{name}" for kind in TensorKeys._fields))
        return keys

    def _key_list(self, names: list[str]) -> list[str]:
        cached = self._key_lists.get(id(names))
        if cached is not None and cached[0] is names:
            return cached[1]
        keys = []
        for name in names:
            k = self.keys(name)
            keys.extend((k.angular_update, k.weight_norm, k.angular_update_theory, k.unit_grad_sq, k.weight_norm_theory))
        if len(self._key_lists) > 16:
            self._key_lists.clear()
        self._key_lists[id(names)] = (names, keys)
        return keys

    def build(self, result: StepResult, tracked_groups: list[str], tracked_names: list[str]) -> dict[str, float]:
        """The metric dict of one labelled measured step (:class:`~lightning_smd.core.result.StepResult`);
        ``tracked_groups``/``tracked_names``: every tracked tensor's (the equilibrium fraction is over all).

        Whole-array work over the tensors (the running L and the equilibrium windows are arrays
        too); per tensor only the metric dict is built, from one key list per set of slices."""
        names, groups, delta, w_norm, star = result.names, result.groups, result.delta, result.w_norm, result.delta_star
        n = len(names)
        finite = np.isfinite(delta) & np.isfinite(w_norm)
        unit_grad = self.state.unit_grad.update_array(names, result.unit_grad_sample, result.step)
        coefficient = np.empty(n)
        for (a, b), group_theory in zip(result.spans, result.slice_theories):
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
        metrics: dict[str, float] = dict(zip(compress(self._key_list(names), mask), compress(columns.ravel().tolist(), mask)))
        if not finite.all() and not self._warned_not_finite:
            self._warned_not_finite = True
            not_finite = [names[i] for i in np.flatnonzero(~finite).tolist()]
            rank_zero_warn(
                f"{self.owner}: step {result.log_step}: Δ_t or ‖w_t‖ is not finite (NaN/inf) for "
                f"{first_names(not_finite)}: the weights or their update hold NaN/inf and no GradScaler "
                "skipped the step. Their running L and ‖w*‖ are neither updated nor logged until they are finite "
                "again. Check the loss, the learning rate, or train with a GradScaler (precision='16-mixed')."
            )
        finite_ratios = ratios[np.isfinite(ratios)]
        if finite_ratios.size:
            metrics["smd/angular_update_ratio/mean"] = math.fsum(finite_ratios.tolist()) / finite_ratios.size
            metrics["smd/angular_update_ratio/min"] = float(finite_ratios.min())
            metrics["smd/angular_update_ratio/max"] = float(finite_ratios.max())
        equilibrium = self.state.equilibrium
        newly = equilibrium.update(result.log_step, groups, names, ratios)
        if newly:
            group_of = dict(zip(names, groups))
            for name, reached in newly.items():
                stage = equilibrium.current_stage(group_of[name])
                metrics[f"smd/equilibrium_step/{name}"] = float(reached)
                metrics[f"smd/steps_to_equilibrium/measured/{name}"] = float(reached - stage.start_step)
        if finite_ratios.size:
            metrics["smd/equilibrium/fraction"] = equilibrium.fraction_reached(tracked_groups, tracked_names)
        if self.state.channels is not None and result.units is not None:
            self.state.channels.build(result.units, result.unit_names, result.unit_counts, result.unit_theories,
                                result.step, result.log_step, into=metrics, delta_star=result.unit_delta_star)
        return metrics
