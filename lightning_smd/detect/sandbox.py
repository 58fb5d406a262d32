"""Side-effect-free forward passes: eager mode, forked RNG, buffers snapshotted and restored."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _force_eager() -> Any:
    """Run ``torch.compile``d code eagerly while recording (returns the stance to exit)."""
    try:
        return torch.compiler.set_stance("force_eager")
    except Exception:  # older torch or dynamo unavailable
        return None


def _cuda_devices(module: nn.Module) -> list[int]:
    devices = {p.device.index for p in module.parameters() if p.device.type == "cuda"}
    return sorted(d for d in devices if d is not None)


def _fork_rng(module: nn.Module):
    return torch.random.fork_rng(devices=_cuda_devices(module))


def _snapshot_buffers(module: nn.Module) -> list[tuple[nn.Module, str, Tensor, Tensor]]:
    saved = []
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and not nn.parameter.is_lazy(buf):
                saved.append((sub, name, buf, buf.detach().clone()))
    return saved


def _restore_buffers(saved: list[tuple[nn.Module, str, Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for sub, name, buf, value in saved:
            sub._buffers[name] = buf
            buf.copy_(value)

