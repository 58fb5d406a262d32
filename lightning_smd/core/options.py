"""The engine's advanced options, as small frozen dataclasses, each validated once, here.

``SMDCallback`` and ``SMDMonitor`` take them grouped (``detection=DetectionOptions(steps=5)``,
``estimates=EstimateOptions(...)``, ``equilibrium=EquilibriumOptions(window=50)``); a bad field
raises :class:`OptionError` when the object is built, naming the class and the field
(``EquilibriumOptions(window=...) must be an int >= 1, got 0``). The rescale knobs are
:class:`~lightning_smd.core.rescale.RescalePolicy`'s (``rescale=RescalePolicy(min_drop=4.0)``),
validated the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

__all__ = ["DETECT_MODES", "RESCALE_MODES", "DetectMode", "DetectionOptions", "EquilibriumOptions", "EstimateOptions",
           "OptionError", "RescaleMode", "check"]

DetectMode = Literal["auto", "structural", "numerical"]
RescaleMode = Literal["drop", "continuous", "equilibrium"]
#: the values of the ``Literal`` types, for validation (one source: the types)
DETECT_MODES: tuple[str, ...] = get_args(DetectMode)
RESCALE_MODES: tuple[str, ...] = get_args(RescaleMode)


class OptionError(ValueError):
    """A bad value of one field of an options dataclass: ``owner(field=...) requirement, got value``."""

    def __init__(self, owner: str, field: str, requirement: str, value: Any) -> None:
        self.owner, self.field, self.requirement, self.value = owner, field, requirement, value
        super().__init__(f"{owner}({field}=...) {requirement}, got {value!r}")


def _int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check(owner: str, field: str, ok: bool, requirement: str, value: Any) -> None:
    """Raise :class:`OptionError` unless ``ok``."""
    if not ok:
        raise OptionError(owner, field, requirement, value)


@dataclass(frozen=True)
class DetectionOptions:
    """How the scale-invariant tensors are found (``docs/detection.md``).

    Args:
        mode: ``"auto"`` (structural candidates confirmed numerically, plus tensors found
            numerically), ``"structural"`` or ``"numerical"``.
        steps: optimizer steps, after the first update, over which the radial cosine is checked.
        radial_threshold: a tensor is numerically scale-invariant when its radial cosine stays below this.
    """

    mode: DetectMode = "auto"
    steps: int = 3
    radial_threshold: float = 1e-4

    def __post_init__(self) -> None:
        name = type(self).__name__
        check(name, "mode", isinstance(self.mode, str) and self.mode in DETECT_MODES,
              f"must be one of {DETECT_MODES}", self.mode)
        check(name, "steps", _int(self.steps, 1), "must be an int >= 1", self.steps)
        check(name, "radial_threshold", _number(self.radial_threshold) and self.radial_threshold > 0,
              "must be a number > 0", self.radial_threshold)


@dataclass(frozen=True)
class EstimateOptions:
    """The running estimate of the unit gradient L.

    Args:
        ema_steps: time constant, in optimizer steps, of the running estimate.
        unit_grad_every: sample L at most every this many steps.
    """

    ema_steps: float = 200.0
    unit_grad_every: int = 8

    def __post_init__(self) -> None:
        name = type(self).__name__
        check(name, "ema_steps", _number(self.ema_steps) and self.ema_steps > 0, "must be a number > 0", self.ema_steps)
        check(name, "unit_grad_every", _int(self.unit_grad_every, 1), "must be an int >= 1", self.unit_grad_every)


@dataclass(frozen=True)
class EquilibriumOptions:
    """When a tensor counts as at equilibrium: the mean of Δ_t/Δ* over ``window`` optimizer steps
    within ``tolerance`` of 1."""

    tolerance: float = 0.1
    window: int = 200

    def __post_init__(self) -> None:
        name = type(self).__name__
        check(name, "tolerance", _number(self.tolerance) and 0 < self.tolerance < 1,
              "must be a number in (0, 1) (0.1: within ±10 %)", self.tolerance)
        check(name, "window", _int(self.window, 1), "must be an int >= 1", self.window)
