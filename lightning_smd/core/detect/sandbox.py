"""Side-effect-free forward passes: eager mode, forked RNG, buffers snapshotted and restored."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map


def force_eager() -> Any:
    """Run ``torch.compile``d code eagerly while recording (returns the stance to exit)."""
    try:
        return torch.compiler.set_stance("force_eager")
    except Exception:  # older torch or dynamo unavailable
        return None


def _cuda_devices(module: nn.Module) -> list[int]:
    devices = {p.device.index for p in module.parameters() if p.device.type == "cuda"}
    return sorted(d for d in devices if d is not None)


def forked_rng(module: nn.Module):
    return torch.random.fork_rng(devices=_cuda_devices(module))


def snapshot_buffers(module: nn.Module) -> list[tuple[nn.Module, str, Tensor, Tensor]]:
    saved = []
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and not nn.parameter.is_lazy(buf):
                saved.append((sub, name, buf, buf.detach().clone()))
    return saved


def restore_buffers(saved: list[tuple[nn.Module, str, Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for sub, name, buf, value in saved:
            sub._buffers[name] = buf
            buf.copy_(value)



def isolated_call(module: nn.Module, swap: dict[str, Tensor], args: tuple, kwargs: dict) -> Any:
    """``module(*args, **kwargs)`` with the tensors in ``swap`` (parameter names relative to
    ``module``) in place of its own, writing into nothing the caller holds.

    Runs on copies: every buffer and every tensor input is cloned first, so a forward that
    updates BatchNorm's running statistics (or works in place on its input) cannot bump the
    version of a tensor an autograd graph saved, as the live forward detection records will be
    backpropagated after this runs. Call under ``torch.no_grad()`` and ``forked_rng``.
    """
    buffers = {n: b.detach().clone() for n, b in module.named_buffers() if not nn.parameter.is_lazy(b)}
    copy = lambda v: v.detach().clone() if isinstance(v, Tensor) else v  # noqa: E731
    return torch.func.functional_call(module, {**buffers, **swap}, tree_map(copy, args), tree_map(copy, kwargs))
