"""The invariance unit of each tracked tensor: the slices of it (rows of dim 0) that are scale-invariant on their own.

A normalization makes its input invariant to a scale per *what it normalizes together*:

* BatchNorm / InstanceNorm (and GroupNorm with one channel per group): each output channel, so a
  conv/linear weight has ``C_out`` units, rows ``w[c]``;
* GroupNorm with ``G`` groups: each group of ``C_out/G`` consecutive output channels;
* LayerNorm / RMSNorm over the last ``d`` features of an output of ``C_out`` features with
  ``d < C_out`` (a per-head norm, e.g. QK-norm after splitting heads): each head, ``C_out/d`` units;
* the direction ``v`` of a weight normalization along dim 0 (torch's ``weight_norm`` parametrization,
  :func:`~lightning_smd.parametrizations.exp_weight_norm`): each output unit ``v[u]``;
* LayerNorm / RMSNorm over all features, legacy ``weight_norm`` hooks, tensors found numerically, and
  anything not recognised: the whole tensor (1 unit), which is always invariant when its units are.

The unit is derived from detection's evidence, carried as data on the candidate
(:attr:`~lightning_smd.core.detect.Candidate.norms`: the normalization modules the tensor's output
feeds, by name; ``functional_norms``; ``weight_norm``) and from the module graph. A tensor feeding several normalizations gets the coarsest unit consistent
with all of them (the gcd of their unit counts). Units are rows of dim 0, so a transposed
convolution (output channels on dim 1) is measured as one unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from torch import nn

from lightning_smd.core.detect.candidate import Candidate

__all__ = ["Unit", "format_units", "invariance_unit", "invariance_units"]

_ROW_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Unit:
    """``count`` units of ``kind`` (``"channel"``, ``"group"``, ``"head"`` or ``"tensor"``) along dim 0."""

    count: int
    kind: str
    why: str = ""

    def __str__(self) -> str:
        return "whole tensor" if self.kind == "tensor" else f"{self.count} {self.kind}s"


_TENSOR = Unit(1, "tensor")


def _norm_unit(norm: nn.Module, out_features: int) -> Unit | None:
    """The unit one normalization module gives a producer of ``out_features`` output features."""
    if isinstance(norm, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return Unit(out_features, "channel")
    if isinstance(norm, nn.GroupNorm):
        if norm.num_channels != out_features:
            return None
        return Unit(norm.num_groups, "channel" if norm.num_groups == out_features else "group")
    if isinstance(norm, (nn.LayerNorm, nn.RMSNorm)):
        shape = tuple(norm.normalized_shape)
        if len(shape) != 1:
            return _TENSOR
        d = int(shape[0])
        if d < out_features and out_features % d == 0:
            return Unit(out_features // d, "head")
        return _TENSOR
    return None


def _weight_norm_unit(root: nn.Module, name: str) -> Unit:
    """``v`` of ``w = scale · v/‖v‖`` (SWN or EWN, ``….parametrizations.<t>.original1``): one
    unit per slice of the parametrization's ``dim`` when that is dim 0, else the whole tensor."""
    chain_name, _, local = name.rpartition(".")
    try:
        chain = root.get_submodule(chain_name)
    except AttributeError:
        return _TENSOR
    dims = {getattr(p, "dim", None) for p in chain.children()}
    original = getattr(chain, local, None)
    if local != "original1" or dims != {0} or original is None or original.dim() < 2:
        return _TENSOR
    return Unit(int(original.shape[0]), "channel", "weight_norm direction, per output unit")


def invariance_unit(root: nn.Module, candidate: Candidate) -> Unit:
    """The invariance unit of the tensor ``candidate`` names in ``root``, from detection's evidence
    (:attr:`~lightning_smd.core.detect.Candidate.norms`, ``functional_norms``, ``weight_norm``)."""
    name = candidate.name
    if candidate.weight_norm and ".parametrizations." in f".{name}":
        return _weight_norm_unit(root, name)
    module_name, _, local = name.rpartition(".")
    try:
        producer = root.get_submodule(module_name) if module_name else root
    except AttributeError:
        return _TENSOR
    if local != "weight" or not isinstance(producer, _ROW_PRODUCERS) or not candidate.norms:
        return _TENSOR
    if candidate.functional_norms:
        return _TENSOR  # a functional norm has no module: nothing finer is known
    out_features = int(producer.weight.shape[0])
    units: list[Unit] = []
    for norm_name in candidate.norms:
        try:
            norm = root.get_submodule(norm_name)
        except AttributeError:
            return _TENSOR  # an unknown module: nothing finer is known
        unit = _norm_unit(norm, out_features)
        if unit is None:
            return _TENSOR
        units.append(unit)
    count = math.gcd(*(u.count for u in units))
    if count == 1:
        return _TENSOR
    kinds = {u.kind for u in units if u.count == count}
    kind = kinds.pop() if len(kinds) == 1 else "group"
    labels = ", ".join(f"{type(root.get_submodule(n)).__name__} ({n})" for n in candidate.norms)
    return Unit(count, kind, labels)


def invariance_units(root: nn.Module, candidates: Mapping[str, Candidate]) -> dict[str, Unit]:
    """:func:`invariance_unit` for every ``name → Candidate``."""
    return {name: invariance_unit(root, candidate) for name, candidate in candidates.items()}


def format_units(units: Mapping[str, Unit]) -> str:
    """The per-channel part of the detection report: each tensor's invariance unit."""
    if not units:
        return ""
    width = max(len(n) for n in units)
    lines = [f"SMD per-channel: {sum(u.count for u in units.values())} invariance units in {len(units)} tensors"]
    lines += [f"  {name:<{width}}  {unit}" for name, unit in units.items()]
    return "\n".join(lines)
