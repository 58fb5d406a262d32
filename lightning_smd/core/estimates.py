"""Running estimate of the unit-gradient statistic L = E‖g̃‖² (or E h̃ with momentum), per tensor.

Measured steps are sparse (every ``log_every_n_steps``), so the moving average is defined in
optimizer steps, not samples: a sample taken ``s`` steps after the previous one is weighted
``1 − exp(−s/τ)`` with ``τ = time_constant`` (the SMD paper averages over about 200 steps). The
average is bias-corrected like Adam's moments so early values are not pulled towards zero.

**Why an estimate of a positive quantity can be negative, and when it is defined.** With
momentum α the sample is ``h̃_t = (‖g_t‖² + 2α⟨v_{t−1}, g_t⟩)·‖w_t‖²`` (seed 001). Its mean L is
positive, but one sample is not: ``⟨v_{t−1}, g_t⟩`` has either sign, and ``‖v‖`` is up to
``‖g‖/(1−α)`` when successive gradients align, so a step whose gradient turns against the
momentum (an oscillating, high-curvature tensor) gives ``h_t`` down to ``(1 − 2α/(1−α))·‖g‖²``
(−17‖g‖² at α = 0.9). An average of a few such samples is negative or noise. With
``positive=True`` the estimate is *defined* only once it rests on at least ``MIN_SAMPLES``
samples and exceeds ``Z`` standard errors (the weighted variance of the samples over their
effective number, Kish's ``(Σw)²/Σw²``); before, and whenever it falls back, :meth:`get` is NaN
and nothing is logged. Without momentum every sample is ``‖g̃_t‖² ≥ 0`` and it is defined from
the second sample on.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["MIN_SAMPLES", "RunningMean", "Z"]

MIN_SAMPLES = 2  # a variance needs two samples
Z = 2.0  # the estimate must exceed Z standard errors to count as a value of a positive quantity


class RunningMean:
    """Per-name exponential moving average over optimizer steps, kept on the host in float64.

    ``positive=True``: the estimated quantity is positive (L); :meth:`get` returns NaN until the
    average is significantly positive (see the module docstring).
    """

    def __init__(self, time_constant: float, positive: bool = False) -> None:
        if not time_constant > 0:
            raise ValueError(f"RunningMean(time_constant=...) (EstimateOptions.ema_steps) must be > 0 optimizer steps, "
                             f"got {time_constant!r}")
        self.time_constant = float(time_constant)
        self.positive = positive
        self._mean: dict[str, float] = {}
        self._square: dict[str, float] = {}
        self._weight: dict[str, float] = {}
        self._weight_sq: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self._last_step: dict[str, int] = {}

    def update(self, names: Sequence[str], samples: Sequence[float], step: int) -> list[float]:
        """Add one sample per name taken at optimizer step ``step``; return the estimates
        (:meth:`get`: NaN where not defined yet).

        Non-finite samples (NaN: not measured this step) leave a name's average unchanged.
        """
        out = []
        for name, value in zip(names, samples):
            gap = max(step - self._last_step.get(name, step - 1), 1)
            keep = math.exp(-gap / self.time_constant)
            if math.isfinite(value):
                self._mean[name] = keep * self._mean.get(name, 0.0) + (1.0 - keep) * value
                self._square[name] = keep * self._square.get(name, 0.0) + (1.0 - keep) * value * value
                self._weight[name] = keep * self._weight.get(name, 0.0) + (1.0 - keep)
                self._weight_sq[name] = keep * keep * self._weight_sq.get(name, 0.0) + (1.0 - keep) ** 2
                self._count[name] = self._count.get(name, 0) + 1
                self._last_step[name] = step
            out.append(self.get(name))
        return out

    def raw(self, name: str) -> float:
        """The bias-corrected average, defined or not (NaN before the first sample)."""
        weight = self._weight.get(name, 0.0)
        return self._mean[name] / weight if weight > 0 else math.nan

    def standard_error(self, name: str) -> float:
        """Standard error of :meth:`raw`: weighted sample variance over the effective count."""
        weight, weight_sq = self._weight.get(name, 0.0), self._weight_sq.get(name, 0.0)
        if weight <= 0 or weight_sq <= 0:
            return math.nan
        mean = self._mean[name] / weight
        variance = max(self._square.get(name, mean * mean * weight) / weight - mean * mean, 0.0)
        return math.sqrt(variance / (weight * weight / weight_sq))

    def get(self, name: str) -> float:
        value = self.raw(name)
        if not self.positive or math.isnan(value):
            return value
        if self._count.get(name, 0) < MIN_SAMPLES or not value > Z * self.standard_error(name):
            return math.nan
        return value

    def reset(self, name: str) -> None:
        for store in (self._mean, self._square, self._weight, self._weight_sq, self._count, self._last_step):
            store.pop(name, None)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": dict(self._mean), "weight": dict(self._weight), "last_step": dict(self._last_step),
                "square": dict(self._square), "weight_sq": dict(self._weight_sq), "count": dict(self._count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._mean = dict(state["mean"])
        self._weight = dict(state["weight"])
        self._last_step = {k: int(v) for k, v in state["last_step"].items()}
        self._square = dict(state["square"])
        self._weight_sq = dict(state["weight_sq"])
        self._count = {k: int(v) for k, v in state["count"].items()}
