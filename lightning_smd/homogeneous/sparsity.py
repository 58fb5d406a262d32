"""Relative sparsity per layer (seed 003): per-unit effective norms and the fraction of small units.

For each output unit ``u`` of a Linear / Conv layer, ``n_u`` is the norm of its effective weight
``w_u``: ``e^{s_u}`` under EWN, ``|γ_u|`` under SWN (the direction ``v_u/‖v_u‖`` has norm 1), and
the row norm ``‖w[u]‖`` otherwise. ``r_u = n_u / max_v n_v``; the layer's relative sparsity at
``t`` is the fraction of units with ``r_u < t``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_smd.parametrizations import unit_scale_kind

__all__ = ["THRESHOLDS", "layer_unit_norms", "relative_sparsity", "threshold_label", "unit_norms"]

THRESHOLDS = (1e-1, 1e-2, 1e-3)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def threshold_label(t: float) -> str:
    """``1e-2 → "lt_1e-2"`` (the metric key segment)."""
    mantissa, exp = f"{t:.0e}".split("e")
    head = mantissa if mantissa != "1" else "1"
    return f"lt_{head}e{int(exp)}"


@torch.no_grad()
def unit_norms(module: nn.Module, name: str = "weight") -> Tensor:
    """``n_u`` of each output unit (dim 0) of ``module.<name>`` (float64, on the host)."""
    kind = unit_scale_kind(module, name)
    if kind is not None and getattr(module.parametrizations[name][0], "dim", 0) == 0:
        scale = module.parametrizations[name].original0.detach().double().reshape(-1)
        return (torch.exp(scale) if kind == "ewn" else scale.abs()).cpu()
    w = getattr(module, name).detach()
    return w.reshape(w.shape[0], -1).double().norm(dim=1).cpu()


def layer_unit_norms(model: nn.Module, which: str = "all") -> dict[str, Tensor]:
    """``layer name → n_u`` for every Linear / Conv layer (``which="all"``) or only the EWN/SWN
    ones (``which="normalized"``), in module order."""
    if which not in ("all", "normalized"):
        raise ValueError(f"which must be 'all' or 'normalized', got {which!r}")
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, _LAYERS):
            continue
        if which == "normalized" and unit_scale_kind(module) is None:
            continue
        out[name] = unit_norms(module)
    return out


def relative_sparsity(norms: Tensor, thresholds: Sequence[float] = THRESHOLDS) -> dict[float, float]:
    """``t → fraction of units with n_u / max n < t``."""
    top = float(norms.max()) if norms.numel() else 0.0
    if top <= 0:
        return {t: float("nan") for t in thresholds}
    r = norms / top
    return {t: float((r < t).double().mean()) for t in thresholds}
