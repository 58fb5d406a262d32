"""``SMDCallback``'s (and ``SMDMonitor``'s) constructor arguments: validation, and the record a resume
compares with its checkpoint.

The everyday arguments are flat; the advanced knobs come grouped in the frozen options dataclasses
(:data:`GROUPS`, and ``rescale=RescalePolicy(...)``), which validate their own fields when they are
built. Here each argument is checked once more only for its type or its flat value.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from lightning_smd.core.detect import select
from lightning_smd.core.options import RESCALE_MODES, DetectionOptions, EquilibriumOptions, EstimateOptions
from lightning_smd.core.rescale import RescalePolicy

__all__ = ["GROUPS", "RESCALE_SETTINGS", "changes", "record", "rescale_policy", "validate"]

#: the plain values ``rescale=`` takes (or a RescalePolicy): off, the default policy, a mode
RESCALE_SETTINGS = (False, True, *RESCALE_MODES)

#: the grouped arguments and the options dataclass each must be
GROUPS: dict[str, type] = {"detection": DetectionOptions, "estimates": EstimateOptions,
                           "equilibrium": EquilibriumOptions}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _fields(cls: type) -> str:
    return ", ".join(f"{f.name}=..." for f in dataclasses.fields(cls))


def validate(a: dict[str, Any], owner: str = "SMDCallback") -> None:
    """Raise ``ValueError`` (``TypeError`` for a group argument of the wrong type) naming the
    argument, as ``owner(argument=...)`` (``SMDCallback`` or ``SMDMonitor``, which take the same
    options), for every value the engine cannot work with."""
    if a["log_every_n_steps"] is not None and not _positive_int(a["log_every_n_steps"]):
        raise ValueError(f"{owner}(log_every_n_steps=...) must be a positive int or None, got {a['log_every_n_steps']!r}")
    if a["figures_every_n_steps"] is not None and not _positive_int(a["figures_every_n_steps"]):
        raise ValueError(f"{owner}(figures_every_n_steps=...) must be an int >= 1 or None, got {a['figures_every_n_steps']!r}")
    if a["figures_dir"] is not None and not isinstance(a["figures_dir"], (str, os.PathLike)):
        raise ValueError(f"{owner}(figures_dir=...) must be a path (str or os.PathLike) or None, got {a['figures_dir']!r}")
    rescale = a["rescale"]
    if not (isinstance(rescale, RescalePolicy)
            or any(rescale is m if isinstance(m, bool) else rescale == m for m in RESCALE_SETTINGS)):
        raise ValueError(
            f"{owner}(rescale=...) must be False, True, 'drop', 'continuous', 'equilibrium' or a "
            f"RescalePolicy({_fields(RescalePolicy)}), got {rescale!r}")
    warm = a["warm_start"]
    if not (isinstance(warm, bool) or _positive_int(warm)):
        raise ValueError(f"{owner}(warm_start=...) must be True, False or a step count >= 1, got {warm!r}")
    steps = a["warmup_steps"]
    if steps is not None and not (_positive_int(steps) or steps == 0 and not isinstance(steps, bool)):
        raise ValueError(f"{owner}(warmup_steps=...) must be None (recognize a warm-up from the LR) or an int >= 0 "
                         f"(0: no warm-up), got {steps!r}")
    if not (isinstance(a["per_channel"], bool) or _positive_int(a["per_channel"])):
        raise ValueError(f"{owner}(per_channel=...) must be True, False or a positive int (steps between "
                         f"per-channel measurements), got {a['per_channel']!r}")
    if not (isinstance(a["verbose"], bool) or a["verbose"] in (0, 1, 2)):
        raise ValueError(f"{owner}(verbose=...) must be True/False, 0, 1 or 2 (2: one row per tensor), "
                         f"got {a['verbose']!r}")
    for argument, cls in GROUPS.items():
        if not isinstance(a[argument], cls):
            raise TypeError(f"{owner}({argument}=...) must be a lightning_smd.{cls.__name__}({_fields(cls)}), "
                            f"got {type(a[argument]).__name__} {a[argument]!r}")
    for argument in ("include", "exclude"):  # regexes and types now, not at fit start
        try:
            select([], **{argument: a[argument]})
        except ValueError as err:
            raise ValueError(f"{owner}({argument}=...): {err}") from None


def rescale_policy(rescale: Any) -> RescalePolicy | None:
    """The :class:`RescalePolicy` a valid ``rescale`` argument stands for: ``None`` for ``False``,
    the default policy (mode ``"drop"``) for ``True``, that mode's default policy for a mode name."""
    if isinstance(rescale, RescalePolicy):
        return rescale
    if rescale is False:
        return None
    return RescalePolicy("drop" if rescale is True else rescale)


#: arguments that only change where or whether things are shown, not what is measured or done
_PRESENTATION = frozenset({"figures_every_n_steps", "figures_dir", "verbose"})


def record(a: dict[str, Any]) -> dict[str, Any]:
    """The arguments that shape measurement and rescale, as they can be checkpointed and compared
    (strings, numbers, lists of regexes; a callable by its repr). A group is recorded field by
    field (``"equilibrium.window"``); ``rescale`` as its mode (``False`` when off) and, when on,
    its policy's other fields (``"rescale.min_drop"``)."""
    out: dict[str, Any] = {}
    for key, value in a.items():
        if key in _PRESENTATION:
            continue
        if key == "rescale":
            policy = rescale_policy(value)
            out[key] = False if policy is None else policy.mode
            if policy is not None:
                out.update(_group_fields(key, policy, skip="mode"))
        elif key in GROUPS:
            out.update(_group_fields(key, value))
        else:
            out[key] = _plain(value)
    return out


def _group_fields(key: str, options: Any, skip: str = "") -> dict[str, Any]:
    return {f"{key}.{f.name}": _plain(getattr(options, f.name)) for f in dataclasses.fields(options) if f.name != skip}


def changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"name=old → new"`` for every argument both records hold with different values."""
    return [f"{k}={saved[k]!r} → {v!r}" for k, v in current.items() if k in saved and saved[k] != v]


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return repr(value)
