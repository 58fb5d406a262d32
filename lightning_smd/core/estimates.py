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

import numpy as np

from lightning_smd.core.rows import NameRows

__all__ = ["MIN_SAMPLES", "RunningMean", "Z"]

MIN_SAMPLES = 2  # a variance needs two samples
Z = 2.0  # the estimate must exceed Z standard errors to count as a value of a positive quantity

_FIELDS = ("mean", "square", "weight", "weight_sq")


class RunningMean:
    """Per-name exponential moving average over optimizer steps, kept on the host in float64.

    ``positive=True``: the estimated quantity is positive (L); :meth:`get` returns NaN until the
    average is significantly positive (see the module docstring).

    Array-backed: one float64 array per quantity over every name seen (a name's row is fixed when
    it first appears), so a measured step of thousands of tensors is a few whole-array operations
    (:meth:`update_array`); names are only mapped to rows, once per list of names.
    """

    def __init__(self, time_constant: float, positive: bool = False) -> None:
        if not time_constant > 0:
            raise ValueError(f"RunningMean(time_constant=...) (EstimateOptions.ema_steps) must be > 0 optimizer steps, "
                             f"got {time_constant!r}")
        self.time_constant = float(time_constant)
        self.positive = positive
        self._clear()

    def _clear(self) -> None:
        self._index = NameRows()  # name → its row in the arrays
        self._arrays = {q: np.zeros(0) for q in _FIELDS}
        self._count = np.zeros(0, dtype=np.int64)  # 0: no sample (the name holds no state)
        self._last_step = np.zeros(0, dtype=np.int64)

    def rows(self, names: Sequence[str]) -> np.ndarray:
        """The rows of ``names`` (new names get new, empty rows); cached for the last list of names."""
        index, grow = self._index.rows(names)
        if grow:
            self._arrays = {q: np.concatenate([v, np.zeros(grow)]) for q, v in self._arrays.items()}
            self._count = np.concatenate([self._count, np.zeros(grow, dtype=np.int64)])
            self._last_step = np.concatenate([self._last_step, np.zeros(grow, dtype=np.int64)])
        return index

    def update(self, names: Sequence[str], samples: Sequence[float], step: int) -> list[float]:
        """Add one sample per name taken at optimizer step ``step``; return the estimates
        (:meth:`get`: NaN where not defined yet).

        Non-finite samples (NaN: not measured this step) leave a name's average unchanged.
        """
        return self.update_array(names, np.asarray(samples, dtype=np.float64), step).tolist()

    def update_array(self, names: Sequence[str], samples: np.ndarray, step: int) -> np.ndarray:
        """:meth:`update` on a float64 array of samples; returns the estimates as an array.
        ``names`` must be distinct."""
        index = self.rows(names)
        a = self._arrays
        count, last = self._count[index], self._last_step[index]
        gap = np.maximum(step - np.where(count > 0, last, step - 1), 1)
        keep = np.exp(-gap / self.time_constant)
        ok = np.isfinite(samples)
        value = np.where(ok, samples, 0.0)
        fresh = 1.0 - keep
        for q, new in (("mean", keep * a["mean"][index] + fresh * value),
                       ("square", keep * a["square"][index] + fresh * value * value),
                       ("weight", keep * a["weight"][index] + fresh),
                       ("weight_sq", keep * keep * a["weight_sq"][index] + fresh * fresh)):
            a[q][index] = np.where(ok, new, a[q][index])
        self._count[index] = count + ok
        self._last_step[index] = np.where(ok, step, last)
        return self._estimates(index)

    def _estimates(self, index: np.ndarray) -> np.ndarray:
        a = self._arrays
        weight, weight_sq, mean = a["weight"][index], a["weight_sq"][index], a["mean"][index]
        has = weight > 0
        safe = np.where(has, weight, 1.0)
        raw = np.where(has, mean / safe, np.nan)
        if not self.positive:
            return raw
        variance = np.maximum(a["square"][index] / safe - raw * raw, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            error = np.sqrt(variance / (weight * weight / weight_sq))
        error = np.where(has & (weight_sq > 0), error, np.nan)
        defined = (self._count[index] >= MIN_SAMPLES) & (raw > Z * error)
        return np.where(defined, raw, np.nan)

    def _at(self, name: str) -> int | None:
        row = self._index.row.get(name)
        return row if row is not None and self._count[row] > 0 else None

    def raw(self, name: str) -> float:
        """The bias-corrected average, defined or not (NaN before the first sample)."""
        row = self._at(name)
        if row is None:
            return math.nan
        weight = float(self._arrays["weight"][row])
        return float(self._arrays["mean"][row]) / weight if weight > 0 else math.nan

    def standard_error(self, name: str) -> float:
        """Standard error of :meth:`raw`: weighted sample variance over the effective count."""
        row = self._at(name)
        if row is None:
            return math.nan
        weight, weight_sq = float(self._arrays["weight"][row]), float(self._arrays["weight_sq"][row])
        if weight <= 0 or weight_sq <= 0:
            return math.nan
        mean = float(self._arrays["mean"][row]) / weight
        variance = max(float(self._arrays["square"][row]) / weight - mean * mean, 0.0)
        return math.sqrt(variance / (weight * weight / weight_sq))

    def get(self, name: str) -> float:
        row = self._at(name)
        return math.nan if row is None else float(self._estimates(np.array([row]))[0])

    def reset(self, name: str) -> None:
        row = self._index.row.get(name)
        if row is not None:
            for v in self._arrays.values():
                v[row] = 0.0
            self._count[row] = 0
            self._last_step[row] = 0

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint format 2: per quantity a ``{name: value}`` dict over the names with a sample."""
        present = np.flatnonzero(self._count > 0).tolist()
        names = [self._index.names[i] for i in present]

        def of(values: np.ndarray) -> dict[str, Any]:
            return dict(zip(names, values[present].tolist()))

        return {"mean": of(self._arrays["mean"]), "weight": of(self._arrays["weight"]),
                "last_step": of(self._last_step), "square": of(self._arrays["square"]),
                "weight_sq": of(self._arrays["weight_sq"]), "count": of(self._count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._clear()
        names = list(state["mean"])
        index = self.rows(names)
        for q in _FIELDS:
            self._arrays[q][index] = [float(state[q][n]) for n in names]
        self._last_step[index] = [int(state["last_step"][n]) for n in names]
        self._count[index] = [int(state["count"][n]) for n in names]
