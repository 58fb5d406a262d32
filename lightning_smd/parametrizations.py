"""Weight parametrizations of seed 003: exponential weight normalization (EWN).

``exp_weight_norm(module)`` registers, with :mod:`torch.nn.utils.parametrize`, the
parametrization ``w_u = exp(s_u) · v_u / ‖v_u‖`` per output unit ``u`` (slices of ``dim``), beside
PyTorch's own standard weight normalization (SWN, ``w_u = γ_u · v_u / ‖v_u‖``,
:func:`torch.nn.utils.parametrizations.weight_norm`). Both store the scale as
``parametrizations.<name>.original0`` (``s`` for EWN, ``γ`` for SWN) and the direction as
``…original1`` (``v``). The direction is scale-invariant per unit under both, so SMD's detection
finds it (reason ``"weight_norm direction"``) and measures it per unit.

Gradient flow on ``(s, v)`` moves ``w_u`` as gradient flow on ``w_u`` with the per-unit learning
rate ``‖w_u‖²`` along ``w_u`` and ``‖w_u‖²/‖v_u‖²`` across it (docs/homogeneous.md): that
is the mechanism of EWN's asymptotic relative sparsity (Morwani & Ramaswamy).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["ExpWeightNorm", "exp_weight_norm", "unit_scale_kind"]

_TINY = 1e-30


class ExpWeightNorm(nn.Module):
    """``w = exp(s) · v / ‖v‖``, the norm taken over every dim except ``dim`` (one unit per slice).

    ``right_inverse(w)`` returns ``(log ‖w_u‖, w)``, so registering it leaves ``w`` unchanged (a
    zero unit gets ``s = log 1e-30``, a weight of ~0 rather than ``-inf``).
    """

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        self.dim = -1 if dim is None else dim

    def forward(self, log_scale: Tensor, direction: Tensor) -> Tensor:
        return torch._weight_norm(direction, torch.exp(log_scale), self.dim)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        norm = torch.norm_except_dim(weight, 2, self.dim)
        return torch.log(norm.clamp_min(_TINY)), weight


def exp_weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    """Apply exponential weight normalization (EWN) to ``module.<name>``, in place; returns ``module``.

    ``w_u = exp(s_u) · v_u / ‖v_u‖`` for each slice ``u`` of ``dim`` (``dim=0``: each output
    unit of a Linear/Conv; ``None``: the whole tensor). ``s`` is
    ``module.parametrizations.<name>.original0`` (shape of ``‖v_u‖``, keepdim) and ``v`` is
    ``…original1``; ``w`` is unchanged at registration. Remove with
    ``torch.nn.utils.parametrize.remove_parametrizations(module, name)``.
    """
    if not isinstance(getattr(module, name, None), Tensor):
        raise ValueError(f"exp_weight_norm: {type(module).__name__} has no tensor {name!r} to parametrize")
    parametrize.register_parametrization(module, name, ExpWeightNorm(dim), unsafe=True)
    return module


def unit_scale_kind(module: nn.Module, name: str = "weight") -> str | None:
    """``"ewn"``, ``"swn"`` or ``None``: how ``module.<name>`` is parametrized (per-unit scale)."""
    if not parametrize.is_parametrized(module, name):
        return None
    chain = module.parametrizations[name]
    if len(chain) != 1:
        return None
    if isinstance(chain[0], ExpWeightNorm):
        return "ewn"
    if isinstance(chain[0], nn.utils.parametrizations._WeightNorm):
        return "swn"
    return None
