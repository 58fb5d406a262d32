"""Running estimate of the unit-gradient statistic L = E‖g̃‖² (or E h̃ with momentum), per tensor.

Measured steps are sparse (every ``log_every_n_steps``), so the moving average is defined in
optimizer steps, not samples: a sample taken ``s`` steps after the previous one is weighted
``1 − exp(−s/τ)`` with ``τ = time_constant`` (the SMD paper averages over about 200 steps). The
average is bias-corrected like Adam's moments so early values are not pulled towards zero.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["RunningMean"]


class RunningMean:
    """Per-name exponential moving average over optimizer steps, kept on the host in float64."""

    def __init__(self, time_constant: float) -> None:
        if not time_constant > 0:
            raise ValueError(f"SMDCallback(ema_steps=...) must be > 0, got {time_constant!r}")
        self.time_constant = float(time_constant)
        self._mean: dict[str, float] = {}
        self._weight: dict[str, float] = {}
        self._last_step: dict[str, int] = {}

    def update(self, names: Sequence[str], samples: Sequence[float], step: int) -> list[float]:
        """Add one sample per name taken at optimizer step ``step``; return the estimates.

        Non-finite samples (NaN: not measured this step) leave a name's average unchanged.
        """
        out = []
        for name, value in zip(names, samples):
            gap = max(step - self._last_step.get(name, step - 1), 1)
            keep = math.exp(-gap / self.time_constant)
            if math.isfinite(value):
                self._mean[name] = keep * self._mean.get(name, 0.0) + (1.0 - keep) * value
                self._weight[name] = keep * self._weight.get(name, 0.0) + (1.0 - keep)
                self._last_step[name] = step
            out.append(self.get(name))
        return out

    def get(self, name: str) -> float:
        weight = self._weight.get(name, 0.0)
        return self._mean[name] / weight if weight > 0 else math.nan

    def reset(self, name: str) -> None:
        for store in (self._mean, self._weight, self._last_step):
            store.pop(name, None)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": dict(self._mean), "weight": dict(self._weight), "last_step": dict(self._last_step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._mean = dict(state.get("mean", {}))
        self._weight = dict(state.get("weight", {}))
        self._last_step = {k: int(v) for k, v in state.get("last_step", {}).items()}
