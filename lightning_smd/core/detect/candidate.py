"""The record of one scale-invariant tensor and the parameter-name cleaning every detection step shares."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Candidate", "clean_name"]

_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


@dataclass(frozen=True)
class Candidate:
    """A scale-invariant parameter tensor.

    Attributes:
        name: parameter name, normalized with :func:`clean_name`.
        reason: human-readable evidence, e.g. ``"Conv2d → BatchNorm2d (layer1.0.bn1)"``.
        source: ``"structural"`` or ``"numerical"``.
    """

    name: str
    reason: str
    source: str


def clean_name(name: str) -> str:
    """Strip the name segments added by wrappers: ``torch.compile`` (``_orig_mod``), FSDP
    (``_fsdp_wrapped_module``) and activation checkpointing (``_checkpoint_wrapped_module``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)

