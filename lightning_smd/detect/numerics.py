"""Numerical detection: radial cosines ``|<g, w>| / (||g||·||w||)`` of gradients, accumulated on device."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_smd.detect.candidate import clean_name
from lightning_smd.detect.sandbox import _fork_rng

__all__ = ["RadialCosineCheck"]


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class RadialCosineCheck:
    """Per-tensor maximum of the radial cosine ``|⟨g, w⟩| / (‖g‖·‖w‖)`` over the updates seen.

    :meth:`update` reads ``p.grad``; it does no host synchronization, so it can run in every
    ``on_before_optimizer_step`` of the detection window. Tensors with zero norm or without
    (or with a zero) gradient are not counted for that update. For sharded tensors (DTensor,
    FSDP shards) pass ``reduce_fn``: it receives the per-shard partial sums stacked as a
    ``[3, N]`` tensor (``⟨w, g⟩``, ``‖w‖²``, ``‖g‖²``) and must return their global sums (e.g. an
    all-reduce); it is called once per update and device that has gradients.
    """

    def __init__(
        self,
        named_params: list[tuple[str, Tensor]],
        reduce_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self._names = [name for name, _ in named_params]
        self._params = [param for _, param in named_params]
        self._reduce_fn = reduce_fn
        self._max: dict[torch.device, Tensor] = {}
        self._index: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}
        self._steps = 0

    @property
    def steps(self) -> int:
        """Number of :meth:`update` calls so far."""
        return self._steps

    def update(self) -> None:
        """Accumulate the radial cosines of the current gradients, on device."""
        groups: dict[torch.device, list[int]] = {}
        for i, param in enumerate(self._params):
            if param.grad is not None:
                groups.setdefault(_local(param).device, []).append(i)
        for device, indices in groups.items():
            self._update_group(device, indices)
        self._steps += 1

    def _update_group(self, device: torch.device, indices: list[int]) -> None:
        weights = [_local(self._params[i]).detach().reshape(-1) for i in indices]
        grads = [_local(self._params[i].grad).reshape(-1) for i in indices]
        dots = torch.stack([torch.dot(w.float(), g.float()) for w, g in zip(weights, grads)])
        w_sq = torch.stack(torch._foreach_norm(weights, 2, dtype=torch.float32)).square()
        g_sq = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square()
        sums = torch.stack([dots, w_sq, g_sq])
        if self._reduce_fn is not None:
            sums = self._reduce_fn(sums)
        dot, w_sq, g_sq = sums.unbind(0)
        cosine = dot.abs() / (w_sq.sqrt() * g_sq.sqrt())
        cosine = torch.where((w_sq > 0) & (g_sq > 0), cosine, torch.nan)
        if device not in self._max:
            self._max[device] = torch.full((len(self._params),), torch.nan, device=device)
        index = self._index_tensor(device, indices)
        running = self._max[device]
        running[index] = torch.fmax(running[index], cosine)  # fmax ignores NaN (skipped)

    def _index_tensor(self, device: torch.device, indices: list[int]) -> Tensor:
        key = (device, tuple(indices))
        if key not in self._index:
            self._index[key] = torch.tensor(indices, dtype=torch.long, device=device)
        return self._index[key]

    def result(self) -> dict[str, float]:
        """Maximum radial cosine per name (NaN if never measured); one host transfer."""
        values = [math.nan] * len(self._names)
        for running in self._max.values():
            for i, value in enumerate(running.cpu().tolist()):
                if not math.isnan(value):
                    values[i] = value if math.isnan(values[i]) else max(values[i], value)
        return dict(zip(self._names, values))


def _projection_loss(output: Any) -> Tensor:
    """A scalar from any model output: scalar tensors (losses) are summed, other tensors
    enter through a fixed random projection."""
    leaves = [
        t for t in tree_flatten(output)[0]
        if isinstance(t, Tensor) and t.requires_grad and t.is_floating_point()
    ]
    if not leaves:
        raise ValueError("the module output contains no differentiable floating-point tensor")
    generator = torch.Generator().manual_seed(0)
    total = leaves[0].new_zeros((), dtype=torch.float32)
    for t in leaves:
        if t.ndim == 0:
            total = total + t.float()
        else:
            weights = torch.randn(t.shape, generator=generator).to(t.device)
            total = total + (t.float() * weights).sum()
    return total


def _radial_cosines(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, float]:
    """Radial cosine of every trainable tensor after one backward, on a deep copy."""
    replica = copy.deepcopy(module)
    replica.train()
    with _fork_rng(replica):
        torch.manual_seed(0)
        _projection_loss(replica(*args, **kwargs)).backward()
    check = RadialCosineCheck(
        [(clean_name(n), p) for n, p in replica.named_parameters() if p.requires_grad]
    )
    check.update()
    return check.result()

