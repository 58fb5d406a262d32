"""Homogeneous networks (seeds 003/004): degree, normalized margin, EWN/SWN relative sparsity.

Torch only, except :class:`HomogeneousCallback` (loaded lazily):

* :func:`homogeneity_degree`: L by scaling and by Euler's identity, and the tensors that break it;
* :func:`normalized_margin`, :func:`smoothed_margin`, :func:`margins`;
* :func:`param_norm` (ρ over the homogeneous parameters; effective weights under EWN/SWN);
* :func:`unit_norms`, :func:`layer_unit_norms`, :func:`relative_sparsity`;
* :func:`pruning_curve`;
* :func:`measure_homogeneous`: one measurement as the contract's metric dict, for any loop.
"""

from typing import TYPE_CHECKING, Any

from lightning_smd.homogeneous.degree import Homogeneity, homogeneity_degree
from lightning_smd.homogeneous.margin import MarginStats, margins, normalized_margin, smoothed_margin
from lightning_smd.homogeneous.measure import collect, measure_homogeneous
from lightning_smd.homogeneous.pruning import pruning_curve
from lightning_smd.homogeneous.scaling import param_norm, scale_handles
from lightning_smd.homogeneous.sparsity import layer_unit_norms, relative_sparsity, unit_norms

if TYPE_CHECKING:
    from lightning_smd.homogeneous.callback import HomogeneousCallback

__all__ = [
    "Homogeneity",
    "HomogeneousCallback",
    "MarginStats",
    "collect",
    "homogeneity_degree",
    "layer_unit_norms",
    "margins",
    "measure_homogeneous",
    "normalized_margin",
    "param_norm",
    "pruning_curve",
    "relative_sparsity",
    "scale_handles",
    "smoothed_margin",
    "unit_norms",
]


def __getattr__(name: str) -> Any:
    if name == "HomogeneousCallback":  # lazy: the rest stays importable without Lightning
        from lightning_smd.homogeneous.callback import HomogeneousCallback

        return HomogeneousCallback
    raise AttributeError(f"module 'lightning_smd.homogeneous' has no attribute {name!r}")
