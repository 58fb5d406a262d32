"""``SMDCallback``'s constructor arguments: validation, and the record a resume compares with its checkpoint."""

from __future__ import annotations

import os
from typing import Any

from lightning_smd.core.detect import select
from lightning_smd.core.options import DetectionOptions, EquilibriumOptions, EstimateOptions, OptionError
from lightning_smd.core.rescale import RescalePolicy

__all__ = ["DETECT_MODES", "FLAT_OPTIONS", "RESCALE_MODES", "changes", "options", "record", "validate"]

DETECT_MODES = ("auto", "structural", "numerical")
RESCALE_MODES = (False, True, "drop", "continuous", "equilibrium")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def validate(a: dict[str, Any], owner: str = "SMDCallback") -> None:
    """Raise ``ValueError`` naming the argument (as ``owner(argument=...)``: ``SMDCallback`` or
    ``SMDMonitor``, which take the same options) for every value the engine cannot work with."""
    if a["log_every_n_steps"] is not None and not _positive_int(a["log_every_n_steps"]):
        raise ValueError(f"{owner}(log_every_n_steps=...) must be a positive int or None, got {a['log_every_n_steps']!r}")
    if a["figures_every_n_steps"] is not None and not _positive_int(a["figures_every_n_steps"]):
        raise ValueError(f"{owner}(figures_every_n_steps=...) must be an int >= 1 or None, got {a['figures_every_n_steps']!r}")
    if a["figures_dir"] is not None and not isinstance(a["figures_dir"], (str, os.PathLike)):
        raise ValueError(f"{owner}(figures_dir=...) must be a path (str or os.PathLike) or None, got {a['figures_dir']!r}")
    if not any(a["rescale"] is m if isinstance(m, bool) else a["rescale"] == m for m in RESCALE_MODES):
        raise ValueError(
            f"{owner}(rescale=...) must be False, True, 'drop', 'continuous' or 'equilibrium', got {a['rescale']!r}")
    warm = a.get("warm_start", False)
    if not (isinstance(warm, bool) or _positive_int(warm)):
        raise ValueError(f"{owner}(warm_start=...) must be True, False or a step count >= 1, got {warm!r}")
    steps = a.get("warmup_steps")
    if steps is not None and not (_positive_int(steps) or steps == 0 and not isinstance(steps, bool)):
        raise ValueError(f"{owner}(warmup_steps=...) must be None (recognize a warm-up from the LR) or an int >= 0 "
                         f"(0: no warm-up), got {steps!r}")
    if "per_channel" in a and not (isinstance(a["per_channel"], bool) or _positive_int(a["per_channel"])):
        raise ValueError(f"{owner}(per_channel=...) must be True, False or a positive int (steps between "
                         f"per-channel measurements), got {a['per_channel']!r}")
    if "verbose" in a and not (isinstance(a["verbose"], bool) or a["verbose"] in (0, 1, 2)):
        raise ValueError(f"{owner}(verbose=...) must be True/False, 0, 1 or 2 (2: one row per tensor), "
                         f"got {a['verbose']!r}")
    options(a, owner)
    for argument in ("include", "exclude"):  # regexes and types now, not at fit start
        try:
            select([], **{argument: a[argument]})
        except ValueError as err:
            raise ValueError(f"{owner}({argument}=...): {err}") from None


#: the flat arguments that are fields of the engine's options dataclasses, validated there
FLAT_OPTIONS: dict[str, tuple[type, str]] = {
    "detect": (DetectionOptions, "mode"), "detect_steps": (DetectionOptions, "steps"),
    "radial_threshold": (DetectionOptions, "radial_threshold"),
    "ema_steps": (EstimateOptions, "ema_steps"), "unit_grad_every": (EstimateOptions, "unit_grad_every"),
    "equilibrium_tolerance": (EquilibriumOptions, "tolerance"), "equilibrium_window": (EquilibriumOptions, "window"),
    "rescale_min_drop": (RescalePolicy, "min_drop"), "rescale_min_lr_ratio": (RescalePolicy, "min_lr_ratio"),
    "rescale_on_increase": (RescalePolicy, "on_increase"),
}


def options(a: dict[str, Any], owner: str = "SMDCallback") -> dict[type, Any]:
    """The options dataclasses built from the flat arguments; a bad value is refused by the dataclass
    and named here as the adapter's argument (``owner(detect_steps=...)``)."""
    built: dict[type, Any] = {}
    for cls in (DetectionOptions, EstimateOptions, EquilibriumOptions, RescalePolicy):
        fields = {field: flat for flat, (c, field) in FLAT_OPTIONS.items() if c is cls}
        try:
            built[cls] = cls(**{field: a[flat] for field, flat in fields.items()})
        except OptionError as err:
            raise ValueError(f"{owner}({fields[err.field]}=...) {err.requirement}, got {err.value!r}") from None
    return built


#: arguments that only change where or whether things are shown, not what is measured or done
_PRESENTATION = frozenset({"figures_every_n_steps", "figures_dir", "verbose"})


def record(a: dict[str, Any]) -> dict[str, Any]:
    """The arguments that shape measurement and rescale, as they can be checkpointed and compared
    (strings, numbers, lists of regexes; a callable by its repr)."""
    return {k: _plain(v) for k, v in a.items() if k not in _PRESENTATION}


def changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"name=old → new"`` for every argument both records hold with different values."""
    return [f"{k}={saved[k]!r} → {v!r}" for k, v in current.items() if k in saved and saved[k] != v]


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return repr(value)
