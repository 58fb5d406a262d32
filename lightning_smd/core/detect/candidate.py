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
        source: ``"structural"``, ``"numerical"`` (or ``"checkpoint"``: restored after a resume).
        norms: the evidence as data: the normalization modules (names in the model, wrapper
            segments removed as by :func:`clean_name`) that the tensor's output feeds, in the
            order of the forward; empty when it feeds none (numerical discoveries, self-normalizing
            modules, weight-normalization directions).
        functional_norms: the functional normalization calls it feeds, which have no module
            (``"F.layer_norm (in block.0)"``).
        weight_norm: whether it is the direction ``v`` of a weight normalization
            (``w = g·v/‖v‖``: torch's ``weight_norm`` or :func:`~lightning_smd.parametrizations.exp_weight_norm`).
        kind: the kind of evidence, without the names and numbers of this tensor
            (``"Conv2d → BatchNorm2d"``, ``"numerical: radial cosine under the bar"``): what the
            grouped detection report groups by. Empty: ``reason`` is the kind.
    """

    name: str
    reason: str
    source: str
    norms: tuple[str, ...] = ()
    functional_norms: tuple[str, ...] = ()
    weight_norm: bool = False
    kind: str = ""


def clean_name(name: str) -> str:
    """Strip the name segments added by wrappers: ``torch.compile`` (``_orig_mod``), FSDP
    (``_fsdp_wrapped_module``) and activation checkpointing (``_checkpoint_wrapped_module``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)

