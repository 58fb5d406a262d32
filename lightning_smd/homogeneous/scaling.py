"""The homogeneous parameters θ of a model, and how to scale them: one :class:`ScaleHandle` per tensor.

θ is every parameter, except that a weight-normalized tensor (SWN, EWN) counts through its
*effective* weight ``w``: scaling ``w`` by ``c`` is ``γ → c·γ`` under SWN, ``s → s + ln c`` under
EWN, and leaves the direction ``v`` alone (it is not part of θ). ``ρ = ‖θ‖₂`` sums ``‖w‖²`` of
the effective weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_smd.parametrizations import unit_scale_kind

__all__ = ["ScaleHandle", "param_norm", "scale_handles"]


@dataclass(frozen=True)
class ScaleHandle:
    """One tensor of θ: ``name`` (the effective tensor, ``"0.weight"``), the stored ``param``
    that carries its scale and ``kind``: ``"plain"`` (θ is ``param``), ``"gain"`` (SWN: ``param``
    is γ) or ``"log_gain"`` (EWN: ``param`` is s)."""

    name: str
    param: nn.Parameter
    kind: str
    module: nn.Module
    local: str

    @torch.no_grad()
    def scale_(self, c: float) -> None:
        """Multiply this tensor of θ by ``c > 0`` in place."""
        if self.kind == "log_gain":
            self.param.add_(math.log(c))
        else:
            self.param.mul_(c)

    def radial(self, grad: Tensor) -> Tensor:
        """``⟨θ_k, ∇_{θ_k} f⟩`` from the gradient of ``param``: ``d f(e^t θ_k)/dt`` at 0."""
        if self.kind == "log_gain":
            return grad.sum()
        return (self.param.detach() * grad).sum()

    def sq_norm(self) -> Tensor:
        """``‖θ_k‖²`` of the effective tensor."""
        p = self.param.detach().double()
        return torch.exp(2 * p).sum() if self.kind == "log_gain" else (p * p).sum()


def scale_handles(model: nn.Module) -> list[ScaleHandle]:
    """The tensors of θ, in parameter order (shared parameters once)."""
    handles: list[ScaleHandle] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for local, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                handles.append(ScaleHandle(prefix + local, p, "plain", module, local))
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, chain in module.parametrizations.items():
            kind = unit_scale_kind(module, tensor_name)
            originals = [(n, p) for n, p in chain.named_parameters(recurse=False)]
            for n, p in originals:
                seen.add(id(p))
            if kind is not None:
                handles.append(ScaleHandle(prefix + tensor_name, chain.original0,
                                           "log_gain" if kind == "ewn" else "gain", module, tensor_name))
            else:  # an unknown parametrization: scale what it stores; the numerical check judges it
                handles += [ScaleHandle(f"{prefix}parametrizations.{tensor_name}.{n}", p, "plain", module, tensor_name)
                            for n, p in originals]
    return handles  # a ParametrizationList is visited after its module: its originals are seen


def param_norm(model: nn.Module | list[ScaleHandle]) -> float:
    """``ρ = ‖θ‖₂`` over the homogeneous parameters (effective weights under SWN/EWN)."""
    handles = model if isinstance(model, list) else scale_handles(model)
    if not handles:
        return 0.0
    return float(torch.stack([h.sq_norm() for h in handles]).sum().sqrt())
