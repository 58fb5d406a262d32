"""Helpers shared by the DataModules: clear "dataset not found" errors, loader defaults."""

from __future__ import annotations

from pathlib import Path


class DatasetNotFoundError(FileNotFoundError):
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


def loader_kwargs(num_workers: int, pin_memory: bool) -> dict:
    """DataLoader kwargs; persistent workers only when there are workers."""
    return {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": num_workers > 0,
    }
