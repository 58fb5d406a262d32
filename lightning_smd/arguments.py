"""``SMDCallback``'s constructor arguments: validation, and the record a resume compares with its checkpoint."""

from __future__ import annotations

import ast
from typing import Any

from lightning_smd.detect import select

__all__ = ["DETECT_MODES", "RESCALE_MODES", "changes", "from_legacy_state_key", "record", "validate"]

DETECT_MODES = ("auto", "structural", "numerical")
RESCALE_MODES = (False, True, "drop", "continuous", "equilibrium")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def validate(a: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the argument for every value ``SMDCallback`` cannot work with."""
    if a["log_every_n_steps"] is not None and not _positive_int(a["log_every_n_steps"]):
        raise ValueError(f"SMDCallback(log_every_n_steps=...) must be a positive int or None, got {a['log_every_n_steps']!r}")
    if a["detect"] not in DETECT_MODES:
        raise ValueError(f"SMDCallback(detect=...) must be one of {DETECT_MODES}, got {a['detect']!r}")
    if not _positive_int(a["detect_steps"]):
        raise ValueError(f"SMDCallback(detect_steps=...) must be an int >= 1, got {a['detect_steps']!r}")
    if not a["radial_threshold"] > 0:
        raise ValueError(f"SMDCallback(radial_threshold=...) must be > 0, got {a['radial_threshold']!r}")
    if a["figures_every_n_steps"] is not None and a["figures_every_n_steps"] < 1:
        raise ValueError(f"SMDCallback(figures_every_n_steps=...) must be >= 1 or None, got {a['figures_every_n_steps']!r}")
    if a["rescale"] not in RESCALE_MODES:
        raise ValueError(
            f"SMDCallback(rescale=...) must be False, True, 'drop', 'continuous' or 'equilibrium', got {a['rescale']!r}")
    warm = a.get("warm_start", False)
    if not (isinstance(warm, bool) or _positive_int(warm)):
        raise ValueError(f"SMDCallback(warm_start=...) must be True, False or a step count >= 1, got {warm!r}")
    if not _positive_int(a["unit_grad_every"]):
        raise ValueError(f"SMDCallback(unit_grad_every=...) must be an int >= 1, got {a['unit_grad_every']!r}")
    if "per_channel" in a and not (isinstance(a["per_channel"], bool) or _positive_int(a["per_channel"])):
        raise ValueError(f"SMDCallback(per_channel=...) must be True, False or a positive int (steps between "
                         f"per-channel measurements), got {a['per_channel']!r}")
    if "verbose" in a and not (isinstance(a["verbose"], bool) or a["verbose"] in (0, 1, 2)):
        raise ValueError(f"SMDCallback(verbose=...) must be True/False, 0, 1 or 2 (2: one row per tensor), "
                         f"got {a['verbose']!r}")
    select([], include=a["include"], exclude=a["exclude"])  # regexes and types now, not at fit start


#: arguments that only change where or whether things are shown, not what is measured or done
_PRESENTATION = frozenset({"figures_every_n_steps", "figures_dir", "verbose"})


def record(a: dict[str, Any]) -> dict[str, Any]:
    """The arguments that shape measurement and rescale, as they can be checkpointed and compared
    (strings, numbers, lists of regexes; a callable by its repr)."""
    return {k: _plain(v) for k, v in a.items() if k not in _PRESENTATION}


def changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"name=old → new"`` for every argument both records hold with different values."""
    return [f"{k}={saved[k]!r} → {v!r}" for k, v in current.items() if k in saved and saved[k] != v]


def from_legacy_state_key(key: str, prefix: str) -> dict[str, Any]:
    """The arguments older versions put into the callback's state key (``SMDCallback{'detect': ...}``)."""
    try:
        arguments = ast.literal_eval(key[len(prefix):])
    except (ValueError, SyntaxError):
        return {}
    return arguments if isinstance(arguments, dict) else {}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return repr(value)
