"""Helpers shared by the DataModules: clear dataset errors, loader defaults that fit the machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DatasetError(Exception):
    """The dataset on disk cannot train this config; the message names the config key, the path
    and the fix. ``examples/train.py`` prints it and exits with status 2, before the model is built."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset is missing on disk; the message says where we looked and how to fix it."""


def require(path: str | Path, what: str, key: str, hint: str) -> Path:
    """Return ``path`` if it exists, else raise :class:`DatasetNotFoundError`.

    Args:
        path: file or folder that must exist.
        what: human name of the thing (``"CIFAR10 batches"``).
        key: the config key that points there (``data.root``).
        hint: what to do (download flag, expected layout).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetNotFoundError(
            f"{what} not found: looked for {p.resolve()} (from {key}). {hint}"
        )
    return p


def check_num_classes(num_classes: int | None, found: int, where: str, what: str = "class folders") -> None:
    """``data.num_classes`` must be what the data holds (``None``: not set, nothing to check)."""
    if num_classes is not None and int(num_classes) != found:
        raise DatasetError(
            f"data.num_classes={num_classes} but {where} has {found} {what}: the model's head would have "
            f"the wrong size. Set data.num_classes={found}."
        )


def check_batches(samples: int, batch_size: int, world_size: int, where: str) -> None:
    """The training loader drops its last incomplete batch: it must keep at least one."""
    per_process = -(-samples // max(1, world_size))  # DistributedSampler pads each rank to ceil(N / W)
    if per_process < batch_size:
        procs = f" per process ({samples} over {world_size} processes)" if world_size > 1 else ""
        raise DatasetError(
            f"data.batch_size={batch_size} is larger than the {per_process} training samples{procs} at {where}: "
            f"the training loader drops incomplete batches (drop_last=True), so not one training step would run. "
            f"Set data.batch_size={max(1, per_process)} or less, or point data.root at the full dataset."
        )


def default_num_workers(trainer: Any, cap: int = 8) -> int:
    """Loader workers for ``num_workers: null``: the CPUs this process may use, per local device,
    minus one for the main process (Lightning's own suggestion), at most ``cap``."""
    from lightning_fabric.utilities.data import suggested_max_num_workers

    devices = int(getattr(trainer, "num_devices", 1) or 1) if trainer is not None else 1
    return min(cap, suggested_max_num_workers(devices))


def default_pin_memory(trainer: Any) -> bool:
    """``pin_memory: null``: pin only when the batches go to a CUDA device."""
    if trainer is None:
        import torch

        return torch.cuda.is_available()
    return getattr(trainer.strategy.root_device, "type", "cpu") == "cuda"


def loader_kwargs(num_workers: int | None, pin_memory: bool | None, trainer: Any = None) -> dict:
    """DataLoader kwargs; ``None`` values follow the machine (:func:`default_num_workers`,
    :func:`default_pin_memory`); persistent workers only when there are workers."""
    workers = default_num_workers(trainer) if num_workers is None else int(num_workers)
    return {
        "num_workers": workers,
        "pin_memory": default_pin_memory(trainer) if pin_memory is None else bool(pin_memory),
        "persistent_workers": workers > 0,
    }
