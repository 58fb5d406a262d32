"""The metrics builder: turns the stacked statistics of one measured step into the logged metric dict."""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor

from lightning_smd.equilibrium import EquilibriumTracker
from lightning_smd.estimates import RunningMean
from lightning_smd.steps import Finished
from lightning_smd.tracking import TrackedSet

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

    ``unit_grad`` (the running L) and ``equilibrium`` are the callback's checkpointed state,
    updated here in place.
    """

    def __init__(self, unit_grad: RunningMean, equilibrium: EquilibriumTracker) -> None:
        self.unit_grad = unit_grad
        self.equilibrium = equilibrium
        self._key_cache: dict[str, TensorKeys] = {}

    def keys(self, name: str) -> TensorKeys:
        """The metric keys of one tensor, built once (shared by every record)."""
        keys = self._key_cache.get(name)
        if keys is None:
            keys = self._key_cache[name] = TensorKeys(*(f"smd/{kind}/{name}" for kind in TensorKeys._fields))
        return keys

    def build(self, stats: Tensor, finished: Finished, tracked: TrackedSet, step: int) -> dict[str, float]:
        """``stats``: the host ``[3, n]`` rows (Δ_t, ‖w_t‖, L sample) of ``finished``'s slices."""
        delta, w_norm, unit_grad_sample = stats.double().tolist()
        index = [i for s in finished.slices for i in range(s.start, s.stop)]
        names = [tracked.names[i] for i in index]
        groups = [tracked.groups[i] for i in index]
        unit_grad = self.unit_grad.update(names, unit_grad_sample, step)
        metrics: dict[str, float] = {}
        ratios: list[float] = []
        i = 0
        for s, group_theory in zip(finished.slices, finished.theories):
            delta_star = group_theory.angular_update
            for _ in s.params:
                name, d = names[i], delta[i]
                keys = self.keys(name)
                metrics[keys.angular_update] = d
                metrics[keys.weight_norm] = w_norm[i]
                metrics[keys.unit_grad_sq] = unit_grad[i]
                ratios.append(d / delta_star if delta_star else math.nan)
                if delta_star is not None:
                    metrics[keys.angular_update_theory] = delta_star
                # single h̃ samples can be negative with momentum; no prediction until the estimate is > 0
                if unit_grad[i] > 0 and (norm_sq := group_theory.equilibrium_norm_sq(unit_grad[i])) is not None:
                    metrics[keys.weight_norm_theory] = math.sqrt(norm_sq)
                i += 1
        finite = [r for r in ratios if math.isfinite(r)]
        if finite:
            metrics["smd/angular_update_ratio/mean"] = sum(finite) / len(finite)
            metrics["smd/angular_update_ratio/min"] = min(finite)
            metrics["smd/angular_update_ratio/max"] = max(finite)
        for name, reached in self.equilibrium.update(finished.log_step, groups, names, ratios).items():
            stage = self.equilibrium.current_stage(groups[names.index(name)])
            metrics[f"smd/equilibrium_step/{name}"] = float(reached)
            metrics[f"smd/steps_to_equilibrium/measured/{name}"] = float(reached - stage.start_step)
        if finite:
            metrics["smd/equilibrium/fraction"] = self.equilibrium.fraction_reached(tracked.groups, tracked.names)
        return metrics
