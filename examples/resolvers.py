"""OmegaConf resolvers used by the configs; registered on import (idempotent).

- ``${linear_lr:base_lr,base_batch,per_device_batch,devices,num_nodes[,accumulate[,accelerator]]}``:
  the linear scaling rule ``base_lr · total_batch / base_batch``.
- ``${linear_steps:steps,base_batch,per_device_batch,devices,num_nodes[,accumulate[,accelerator]]}``:
  a schedule given in iterations at ``base_batch`` images, in iterations at the total batch.
- ``${world_size:devices,num_nodes[,accelerator]}``: ``devices × num_nodes``.
- ``${slurm_devices:devices}``: GPUs (= tasks) per SLURM node; refuses ``auto`` naming the key.

``devices`` may be ``auto`` (or -1) where the accelerator is known: ``cpu`` → 1 process, ``gpu`` /
``cuda`` / ``auto`` → the CUDA devices of this machine (1 without one), as Lightning resolves it.
- ``${wandb_offline_default:}``: ``True`` unless W&B credentials are available.
- ``${milestones_at:[0.5,0.75],${trainer.max_epochs}}``: milestones as fractions of the run's
  length (``round(f × total)``, each ≥ 1), so a schedule scales with ``trainer.max_epochs``
  (or ``max_steps`` for ``interval: step``); no milestone when the length is -1 (a ``max_steps``
  run) or 1 (set ``scheduler.milestones`` then).
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf


def device_count(devices, accelerator="auto") -> int:
    """Processes per node for ``trainer.devices`` (an int, a list of ids, a "0,1" string, or ``auto`` / -1)."""
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str) and devices.strip() not in ("auto", "-1"):
        parts = [p for p in devices.split(",") if p.strip()]
        if len(parts) > 1 or devices.strip().endswith(","):
            return len(parts)  # Lightning: "0,1" and "3," are device ids
        devices = int(parts[0]) if parts and parts[0].strip().lstrip("-").isdigit() else devices
    if devices in ("auto", -1):
        if str(accelerator).lower() == "cpu":
            return 1
        import torch

        return max(1, torch.cuda.device_count()) if str(accelerator).lower() in ("gpu", "cuda", "auto") else 1
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ValueError(f"trainer.devices must be a positive int, a list of device ids or auto, got {devices!r}")
    return devices


def linear_lr(base_lr, base_batch, per_device_batch, devices, num_nodes=1, accumulate=1, accelerator="auto") -> float:
    """``base_lr × (per_device_batch × devices × num_nodes × accumulate) / base_batch``."""
    total = int(per_device_batch) * device_count(devices, accelerator) * int(num_nodes) * int(accumulate)
    return float(base_lr) * total / float(base_batch)


def linear_steps(steps, base_batch, per_device_batch, devices, num_nodes=1, accumulate=1, accelerator="auto") -> int:
    """``steps × base_batch / total_batch``, rounded, at least 1: the same number of images seen."""
    total = int(per_device_batch) * device_count(devices, accelerator) * int(num_nodes) * int(accumulate)
    return max(1, round(int(steps) * float(base_batch) / total))


def world_size(devices, num_nodes=1, accelerator="auto") -> int:
    """``devices × num_nodes`` (FSDP2's data-parallel size: shard over every process)."""
    return device_count(devices, accelerator) * int(num_nodes)


def slurm_devices(devices) -> int:
    """GPUs per node (one SLURM task each) for the submitit launcher: ``auto`` cannot be resolved on
    the machine that submits the job (often without a GPU), so it is refused, naming the key."""
    if devices in ("auto", -1, "-1"):
        raise ValueError(
            "hydra/launcher=slurm needs trainer.devices=<GPUs per node> (e.g. trainer.devices=8): "
            "'auto' would count the GPUs of the machine that submits the job, not of the compute nodes"
        )
    return device_count(devices)


def milestones_at(fractions, total) -> list[int]:
    """``[round(f × total) for f in fractions]``: LR milestones at fractions of the run's length."""
    if OmegaConf.is_list(fractions):
        fractions = list(fractions)
    if not isinstance(fractions, (list, tuple)) or not all(isinstance(f, (int, float)) and 0 < f < 1 for f in fractions):
        raise ValueError(f"milestones_at needs a list of fractions in (0, 1), got {fractions!r}")
    if isinstance(total, bool) or not isinstance(total, int):
        raise ValueError(f"milestones_at needs the run's length (trainer.max_epochs) as an integer, got {total!r}")
    if total < 2:  # max_epochs=-1 (a max_steps run) or a one-epoch run: no room for a drop
        return []
    return [min(max(1, round(f * total)), total - 1) for f in fractions]


def _netrc_has_wandb() -> bool:
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not path.is_file():
        return False
    try:
        return netrc.netrc(str(path)).authenticators("api.wandb.ai") is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_offline_default() -> bool:
    """Offline unless W&B can log in: an explicit ``WANDB_MODE`` wins, then ``WANDB_API_KEY``,
    then an ``api.wandb.ai`` entry in ``~/.netrc`` (what ``wandb login`` writes)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode.lower() in ("offline", "dryrun", "disabled")
    if os.environ.get("WANDB_API_KEY"):
        return False
    return not _netrc_has_wandb()


def register() -> None:
    """Register the resolvers (safe to call more than once)."""
    OmegaConf.register_new_resolver("linear_lr", linear_lr, replace=True)
    OmegaConf.register_new_resolver("linear_steps", linear_steps, replace=True)
    OmegaConf.register_new_resolver("world_size", world_size, replace=True)
    OmegaConf.register_new_resolver("slurm_devices", slurm_devices, replace=True)
    OmegaConf.register_new_resolver("milestones_at", milestones_at, replace=True)
    OmegaConf.register_new_resolver("wandb_offline_default", wandb_offline_default, replace=True, use_cache=False)


register()
