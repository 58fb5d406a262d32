"""Which of a training loop's loggers are of a kind, in either Lightning namespace, without importing Lightning.

``pytorch_lightning`` and ``lightning.pytorch`` define distinct logger classes (an ``isinstance``
against one namespace's ``TensorBoardLogger`` is False for the other's), so loggers are recognised
by class name, through the MRO (subclasses count).
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_kind", "loggers_of_kind"]


def is_kind(obj: Any, *class_names: str) -> bool:
    """Whether ``obj`` is an instance of a class of one of these names, in either namespace."""
    return any(cls.__name__ in class_names for cls in type(obj).__mro__)


def loggers_of_kind(trainer: Any, *class_names: str) -> list[Any]:
    """The ``trainer.loggers`` of these classes, on global rank 0 only (elsewhere none)."""
    if not getattr(trainer, "is_global_zero", True):
        return []
    return [lg for lg in getattr(trainer, "loggers", []) if is_kind(lg, *class_names)]
