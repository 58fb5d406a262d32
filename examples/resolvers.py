"""OmegaConf resolvers used by the configs; registered on import (idempotent).

- ``${linear_lr:base_lr,base_batch,per_device_batch,devices,num_nodes[,accumulate]}``:
  the linear scaling rule ``base_lr · total_batch / base_batch``.
- ``${world_size:devices,num_nodes}``: ``devices × num_nodes``.
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


def linear_lr(base_lr, base_batch, per_device_batch, devices, num_nodes=1, accumulate=1) -> float:
    """``base_lr × (per_device_batch × devices × num_nodes × accumulate) / base_batch``."""
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        devices = len(devices)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ValueError(
            f"linear_lr needs the device count to be a number, got trainer.devices={devices!r}; "
            "set trainer.devices=<int> (or optimizer.lr=<value> directly)"
        )
    total = int(per_device_batch) * devices * int(num_nodes) * int(accumulate)
    return float(base_lr) * total / float(base_batch)


def world_size(devices, num_nodes=1) -> int:
    """``devices × num_nodes`` (FSDP2's data-parallel size: shard over every process)."""
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        devices = len(devices)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ValueError(
            f"world_size needs trainer.devices to be a number, got {devices!r}; set trainer.devices=<int>"
        )
    return devices * int(num_nodes)


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
    OmegaConf.register_new_resolver("world_size", world_size, replace=True)
    OmegaConf.register_new_resolver("milestones_at", milestones_at, replace=True)
    OmegaConf.register_new_resolver("wandb_offline_default", wandb_offline_default, replace=True, use_cache=False)


register()
