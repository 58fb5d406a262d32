"""Per-channel metrics: turns the per-unit columns of a measured step's host statistics into distributions, stalled fractions and histograms.

Every tracked tensor with per-unit statistics (see :mod:`lightning_smd.units`) contributes, per
measured step, one Δ_t, ‖w_t‖ and unit-gradient sample per invariance unit. From them, on the host
(the values came with the per-tensor statistics in the step's one transfer):

* ``smd/channel/angular_update/{p05,p50,p95}/{name}`` and ``smd/channel/weight_norm/{p05,p50,p95}/{name}``:
  percentiles over the tensor's units;
* ``smd/channel/weight_norm_theory/{p05,p50,p95}/{name}``: of each unit's predicted ‖w*‖ from its own
  running L (SGD family; every unit shares its group's η, λ, μ);
* ``smd/channel/angular_update_ratio/{p05,p50,p95}``: of Δ_t/Δ* over all units of all tensors (Δ* is
  the group's: it does not depend on the norm, so it is the same for every unit);
* ``smd/channel/stalled_fraction/{name}``: the fraction of units whose Δ_t/Δ* stayed below
  :data:`STALL_RATIO` at every measured step for at least the equilibrium window (dead filters).

:class:`ChannelMetrics` also keeps the per-unit Δ_t/Δ* of the recent measured steps (a bounded,
thinned record) for the units × steps heatmaps, and the latest per-unit values for the histograms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lightning_smd.core import theory

__all__ = ["PERCENTILES", "STALL_RATIO", "ChannelMetrics", "UnitHistory"]

PERCENTILES = (5, 50, 95)
_SUFFIX = tuple(f"p{q:02d}" for q in PERCENTILES)
#: a unit whose Δ_t stays below this fraction of Δ* over the equilibrium window is stalled
STALL_RATIO = 0.1


@dataclass
class UnitHistory:
    """Per-unit Δ_t/Δ* of one tensor over measured steps, at most ``capacity`` columns: when full,
    every other column is dropped (the record thins evenly, a long run keeps its whole span)."""

    capacity: int = 256
    steps: list[int] = field(default_factory=list)
    columns: list[np.ndarray] = field(default_factory=list)
    _stride: int = 1
    _seen: int = 0

    def append(self, step: int, values: np.ndarray) -> None:
        self._seen += 1
        if (self._seen - 1) % self._stride:
            return
        self.steps.append(int(step))
        self.columns.append(values.astype(np.float32))
        if len(self.columns) > self.capacity:
            self.steps, self.columns = self.steps[::2], self.columns[::2]
            self._stride *= 2

    def matrix(self) -> np.ndarray:
        """``[units, steps]``."""
        return np.stack(self.columns, axis=1) if self.columns else np.zeros((0, 0), np.float32)


class ChannelMetrics:
    """Per measured step, the per-channel metrics of the tensors with per-unit statistics.

    ``window``: the equilibrium window in optimizer steps; ``ema_steps``: the time constant of the
    per-unit running L (like :class:`~lightning_smd.estimates.RunningMean`, bias-corrected).
    This state is not checkpointed: after a resume the running L and the stall windows start anew.
    """

    def __init__(self, window: int, ema_steps: float, history_capacity: int = 256) -> None:
        self.window = int(window)
        self.time_constant = float(ema_steps)
        self.history_capacity = history_capacity
        self.history: dict[str, UnitHistory] = {}
        self.latest: dict[str, np.ndarray] = {}  # name → the last per-unit Δ_t/Δ* (or Δ_t without theory)
        self.latest_norm: dict[str, np.ndarray] = {}  # name → the last per-unit ‖w_t‖
        self.has_theory: dict[str, bool] = {}  # name → whether `latest`/`history` hold Δ_t/Δ* (else Δ_t)
        self.fresh = False  # a per-channel step was built and its histograms not yet logged
        self.stalled: dict[str, float] = {}
        self._below_since: dict[str, np.ndarray] = {}
        self._mean: dict[str, np.ndarray] = {}
        self._weight: dict[str, np.ndarray] = {}
        self._last: dict[str, np.ndarray] = {}
        self._keys: dict[str, tuple[tuple[str, ...], ...]] = {}

    def keys(self, name: str) -> tuple[tuple[str, ...], ...]:
        keys = self._keys.get(name)
        if keys is None:
            keys = self._keys[name] = tuple(
                tuple(f"smd/channel/{kind}/{p}/{name}" for p in _SUFFIX)
                for kind in ("angular_update", "weight_norm", "weight_norm_theory"))
        return keys

    def _unit_grad(self, name: str, sample: np.ndarray, step: int) -> np.ndarray:
        mean = self._mean.get(name)
        if mean is None or mean.shape != sample.shape:
            mean = self._mean[name] = np.zeros_like(sample)
            self._weight[name] = np.zeros_like(sample)
            self._last[name] = np.full(sample.shape, step - 1, dtype=np.int64)
        weight, last = self._weight[name], self._last[name]
        keep = np.exp(-np.maximum(step - last, 1) / self.time_constant)
        ok = np.isfinite(sample)
        mean[ok] = keep[ok] * mean[ok] + (1.0 - keep[ok]) * sample[ok]
        weight[ok] = keep[ok] * weight[ok] + (1.0 - keep[ok])
        last[ok] = step
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(weight > 0, mean / weight, np.nan)

    def _stall(self, name: str, ratio: np.ndarray, step: int) -> float:
        since = self._below_since.get(name)
        if since is None or since.shape != ratio.shape:
            since = np.full(ratio.shape, np.nan)
        below = ratio < STALL_RATIO  # NaN (not finite) is not below
        since = np.where(below, np.where(np.isnan(since), step, since), np.nan)
        self._below_since[name] = since
        return float(np.mean(below & (step - since >= self.window))) if ratio.size else math.nan

    def build(self, units: np.ndarray, names: list[str], counts: list[int], theories: list[theory.GroupTheory],
              step: int, log_step: int) -> dict[str, float]:
        """``units``: host ``[3, m]`` (Δ_t, ‖w_t‖, L sample) of the tensors ``names`` with ``counts``
        units each (in order); ``theories[i]``: the group theory of ``names[i]``."""
        metrics: dict[str, float] = {}
        all_ratios = []
        at = 0
        for name, k, group_theory in zip(names, counts, theories):
            delta, w_norm, sample = units[0, at:at + k], units[1, at:at + k], units[2, at:at + k]
            at += k
            delta_keys, norm_keys, theory_keys = self.keys(name)
            finite = np.isfinite(delta) & np.isfinite(w_norm)
            if finite.any():
                for key, v in zip(delta_keys, np.percentile(delta[finite], PERCENTILES)):
                    metrics[key] = float(v)
                for key, v in zip(norm_keys, np.percentile(w_norm[finite], PERCENTILES)):
                    metrics[key] = float(v)
            unit_grad = self._unit_grad(name, np.where(finite, sample, np.nan), step)
            try:  # ‖w*‖² ∝ √L (SGD family): the value at L = 1 scales to every unit
                one = group_theory.equilibrium_norm_sq(1.0)
            except ValueError:  # η or λ not positive: no equilibrium
                one = None
            if one is not None:
                with np.errstate(invalid="ignore"):
                    predicted = math.sqrt(one) * np.where(unit_grad > 0, unit_grad, np.nan) ** 0.25
                if np.isfinite(predicted).any():
                    for key, v in zip(theory_keys, np.nanpercentile(predicted, PERCENTILES)):
                        metrics[key] = float(v)
            delta_star = group_theory.angular_update
            if delta_star:
                ratio = np.where(finite, delta / delta_star, np.nan)
                all_ratios.append(ratio[finite])
                self.stalled[name] = metrics[f"smd/channel/stalled_fraction/{name}"] = self._stall(name, ratio, log_step)
            else:
                ratio = np.where(finite, delta, np.nan)
            self.latest[name] = ratio
            self.latest_norm[name] = np.where(finite, w_norm, np.nan)
            self.has_theory[name] = bool(delta_star)
            self.history.setdefault(name, UnitHistory(self.history_capacity)).append(log_step, ratio)
        self.fresh = True
        if all_ratios and (pooled := np.concatenate(all_ratios)).size:
            for p, v in zip(_SUFFIX, np.percentile(pooled, PERCENTILES)):
                metrics[f"smd/channel/angular_update_ratio/{p}"] = float(v)
        return metrics
