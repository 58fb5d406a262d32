"""Pruning curve: accuracy with the smallest p % of each layer's units zeroed (by ``n_u``).

A unit is zeroed at its output (a forward hook multiplies the channel by 0), so the same code
works for plain, SWN and EWN layers; nothing in the model is modified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lightning_smd.homogeneous.sparsity import layer_unit_norms

__all__ = ["DEFAULT_FRACTIONS", "accuracy", "pruned", "pruning_curve"]

DEFAULT_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def accuracy(logits: Tensor, targets: Tensor) -> float:
    """Top-1 accuracy; one logit: the sign against labels in ``{0,1}`` or ``{−1,+1}``."""
    if logits.dim() == 1 or logits.shape[-1] == 1:
        pred = logits.reshape(-1) > 0
        return float((pred == (targets.reshape(-1) > 0)).double().mean())
    return float((logits.argmax(-1) == targets).double().mean())


def _masks(norms: dict[str, Tensor], fraction: float) -> dict[str, Tensor]:
    masks = {}
    for name, n in norms.items():
        k = int(fraction * n.numel())
        mask = torch.ones_like(n)
        if k:
            mask[torch.argsort(n)[:k]] = 0.0
        masks[name] = mask
    return masks


@contextmanager
def pruned(model: nn.Module, masks: dict[str, Tensor]):
    """Within the block, the output units of each ``layer → mask`` (1 keep, 0 zero) are zeroed."""
    modules = dict(model.named_modules())
    handles = []

    def hook(mask: Tensor) -> Callable:
        def zero_units(module, args, out):
            shape = [1] * out.dim()
            shape[-1 if isinstance(module, nn.Linear) else 1] = -1
            return out * mask.to(out).reshape(shape)
        return zero_units

    try:
        for name, mask in masks.items():
            handles.append(modules[name].register_forward_hook(hook(mask)))
        yield model
    finally:
        for h in handles:
            h.remove()


def default_layers(model: nn.Module) -> list[str]:
    """Every Linear / Conv layer but the last (the one that produces the logits)."""
    return list(layer_unit_norms(model))[:-1]


@torch.no_grad()
def pruning_curve(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    layers: Sequence[str] | None = None,
    forward: Callable[[nn.Module, Tensor], Tensor] | None = None,
) -> dict[float, float]:
    """``fraction → accuracy`` with the smallest ``fraction`` of units of each layer in
    ``layers`` (default :func:`default_layers`) zeroed, ranked by ``n_u``
    (:mod:`~lightning_smd.homogeneous.sparsity`). ``batches`` is an iterable of ``(x, y)``
    (materialized once); ``forward(model, x)`` defaults to ``model(x)``."""
    batches = list(batches)
    names = list(layers) if layers is not None else default_layers(model)
    norms = {k: v for k, v in layer_unit_norms(model).items() if k in names}
    missing = set(names) - set(norms)
    if missing:
        raise ValueError(f"pruning_curve: no Linear/Conv layer named {sorted(missing)}")
    run = forward or (lambda m, x: m(x))
    curve = {}
    for p in fractions:
        with pruned(model, _masks(norms, p)):
            logits = torch.cat([run(model, x) for x, _ in batches])
        curve[float(p)] = accuracy(logits, torch.cat([y for _, y in batches]).to(logits.device))
    return curve
