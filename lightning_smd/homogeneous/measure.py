"""One measurement of a homogeneous network as a metric dict: usable in any training loop.

:func:`measure_homogeneous` puts the model in eval mode, runs it on a bounded set of batches
with no gradient, and returns the keys of the public contract (``prefix="homogeneous"``):

* ``{prefix}/degree``, ``{prefix}/param_norm``;
* ``{prefix}/normalized_margin``, ``{prefix}/smoothed_margin`` (only while defined),
  ``{prefix}/margin/p05``, ``{prefix}/margin/p50``, ``{prefix}/support_count``;
* ``{prefix}/relative_sparsity/{lt_1e-1,lt_1e-2,lt_1e-3}/{layer}``, and
  ``{prefix}/min_relative_norm/{layer}`` (``min_u r_u``: it moves long before a threshold is crossed)
  and ``{prefix}/layer_norm/{layer}`` (``‖W‖ = (Σ_u n_u²)^½`` of the effective weight: how ρ splits
  over the layers, which γ̄ = q_min/ρ^L depends on).

A model that is not homogeneous gets no degree and no margin key at all (only ``param_norm``
and sparsity, which do not depend on homogeneity).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_smd.homogeneous.degree import Homogeneity, homogeneity_degree
from lightning_smd.homogeneous.margin import normalized_margin
from lightning_smd.homogeneous.scaling import param_norm
from lightning_smd.homogeneous.sparsity import THRESHOLDS, layer_unit_norms, relative_sparsity, threshold_label

__all__ = ["collect", "default_split", "measure_homogeneous"]


def default_split(batch: Any) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of a batch: a tuple/list ``(x, y, …)`` or a dict with ``x``/``y`` (or ``input``/``target``)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for xk, yk in (("x", "y"), ("input", "target"), ("inputs", "targets")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} into (inputs, targets); "
                    "pass split=lambda batch: (x, y)")


def collect(batches: Iterable[Any], max_samples: int | None, device: torch.device | None = None,
            split: Callable[[Any], tuple[Tensor, Tensor]] = default_split) -> list[tuple[Tensor, Tensor]]:
    """Up to ``max_samples`` examples of ``batches`` as ``(x, y)`` pairs on ``device``."""
    out, n = [], 0
    for batch in batches:
        x, y = split(batch)
        if max_samples is not None and n + len(y) > max_samples:
            x, y = x[: max_samples - n], y[: max_samples - n]
        if len(y):
            out.append((x.to(device) if device is not None else x, y.to(device) if device is not None else y))
        n += len(y)
        if max_samples is not None and n >= max_samples:
            break
    return out


def measure_homogeneous(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    *,
    homogeneity: Homogeneity | None = None,
    loss: str = "logistic",
    sparsity_layers: str = "normalized",
    prefix: str = "homogeneous",
    degree_samples: int = 256,
) -> tuple[dict[str, float], Homogeneity]:
    """Measure ``model`` on ``batches`` (``(x, y)`` pairs, see :func:`collect`).

    ``homogeneity``: a result to reuse (else it is measured on the first ``degree_samples``
    examples). Returns ``(metrics, homogeneity)``.
    """
    if not batches:
        raise ValueError("measure_homogeneous: no examples to measure")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if homogeneity is None:
            homogeneity = homogeneity_degree(model, batches[0][0][:degree_samples])
        metrics: dict[str, float] = {}
        rho = param_norm(model)
        metrics[f"{prefix}/param_norm"] = rho
        if homogeneity.homogeneous and rho > 0:
            with torch.no_grad():
                logits = torch.cat([model(x) for x, _ in batches])
            targets = torch.cat([y for _, y in batches])
            stats = normalized_margin(logits, targets, rho, homogeneity.degree, loss=loss)
            metrics[f"{prefix}/degree"] = float(homogeneity.degree)
            metrics[f"{prefix}/normalized_margin"] = stats.normalized
            if stats.smoothed is not None:
                metrics[f"{prefix}/smoothed_margin"] = stats.smoothed
            metrics[f"{prefix}/margin/p05"] = stats.percentiles[5]
            metrics[f"{prefix}/margin/p50"] = stats.percentiles[50]
            metrics[f"{prefix}/support_count"] = float(stats.support_count)
        if sparsity_layers != "none":
            for layer, norms in layer_unit_norms(model, sparsity_layers).items():
                for t, frac in relative_sparsity(norms, THRESHOLDS).items():
                    metrics[f"{prefix}/relative_sparsity/{threshold_label(t)}/{layer or '<root>'}"] = frac
                if float(norms.max()) > 0:
                    metrics[f"{prefix}/min_relative_norm/{layer or '<root>'}"] = float(norms.min() / norms.max())
                metrics[f"{prefix}/layer_norm/{layer or '<root>'}"] = float(norms.norm())
    finally:
        for m, training in modes:
            m.training = training
    return metrics, homogeneity
