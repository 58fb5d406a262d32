"""The metrics builder: turns the stacked statistics of one measured step into the logged metric dict."""

from __future__ import annotations

import math
from typing import NamedTuple

from lightning_smd.core.messages import rank_zero_warn

from lightning_smd.core.channels import ChannelMetrics
from lightning_smd.core.equilibrium import EquilibriumTracker
from lightning_smd.core.estimates import RunningMean
from lightning_smd.core.state import SMDState
from lightning_smd.core.result import StepResult
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

    def build(self, result: StepResult, tracked_groups: list[str], tracked_names: list[str]) -> dict[str, float]:
        """The metric dict of one labelled measured step (:class:`~lightning_smd.core.result.StepResult`);
        ``tracked_groups``/``tracked_names``: every tracked tensor's (the equilibrium fraction is over all)."""
        names, groups, delta, w_norm = result.names, result.groups, result.delta, result.w_norm
        unit_grad = self.unit_grad.update(names, result.unit_grad_sample, result.step)
        metrics: dict[str, float] = {}
        ratios: list[float] = []
        not_finite: list[str] = []
        for i, (name, group_theory, delta_star) in enumerate(zip(names, result.theories, result.delta_star)):
            d = delta[i]
            keys = self.keys(name)
            metrics[keys.angular_update] = d
            metrics[keys.weight_norm] = w_norm[i]
            ratios.append(d / delta_star if delta_star else math.nan)
            if delta_star is not None:
                metrics[keys.angular_update_theory] = delta_star
            if not (math.isfinite(d) and math.isfinite(w_norm[i])):
                # NaN/inf weights or update: the running L (which skipped the sample) and ‖w*‖
                # would be stale values that describe no step of this run
                not_finite.append(name)
                continue
            # NaN until the running L is defined (enough samples, significantly > 0: see estimates.py)
            if math.isfinite(unit_grad[i]):
                metrics[keys.unit_grad_sq] = unit_grad[i]
            if unit_grad[i] > 0 and (norm_sq := group_theory.equilibrium_norm_sq(unit_grad[i])) is not None:
                metrics[keys.weight_norm_theory] = math.sqrt(norm_sq)
        if not_finite and not self._warned_not_finite:
            self._warned_not_finite = True
            rank_zero_warn(
                f"{self.owner}: step {result.log_step}: Δ_t or ‖w_t‖ is not finite (NaN/inf) for "
                f"{first_names(not_finite)}: the weights or their update hold NaN/inf and no GradScaler "
                "skipped the step. Their running L and ‖w*‖ are neither updated nor logged until they are finite "
                "again. Check the loss, the learning rate, or train with a GradScaler (precision='16-mixed')."
            )
        finite = [r for r in ratios if math.isfinite(r)]
        if finite:
            metrics["smd/angular_update_ratio/mean"] = sum(finite) / len(finite)
            metrics["smd/angular_update_ratio/min"] = min(finite)
            metrics["smd/angular_update_ratio/max"] = max(finite)
        for name, reached in self.equilibrium.update(result.log_step, groups, names, ratios).items():
            stage = self.equilibrium.current_stage(groups[names.index(name)])
            metrics[f"smd/equilibrium_step/{name}"] = float(reached)
            metrics[f"smd/steps_to_equilibrium/measured/{name}"] = float(reached - stage.start_step)
        if finite:
            metrics["smd/equilibrium/fraction"] = self.equilibrium.fraction_reached(tracked_groups, tracked_names)
        if self.channels is not None and result.units is not None:
            metrics.update(self.channels.build(result.units, result.unit_names, result.unit_counts,
                                               result.unit_theories, result.step, result.log_step))
        return metrics
