"""One wheel for both Lightning namespaces: ``pytorch_lightning`` and ``lightning.pytorch``.

Their classes are distinct (an ``isinstance`` against the other namespace's loggers or strategies
is False) and each namespace's ``rank_zero_only.rank`` is set by its own Trainer only. So the
adapter resolves the namespace of the Trainer it is given (``type(trainer).__module__``), recognises
loggers and strategies by class name (through the MRO: subclasses count), and takes the rank from
the Trainer itself (``trainer.global_rank``), kept here for the warnings and reports of the parts.
"""

from __future__ import annotations

from typing import Any

from lightning_smd.core.messages import rank_zero_info, rank_zero_warn, set_logger, set_rank
from lightning_smd.report.loggers import is_kind

__all__ = ["bind", "is_kind", "namespace_of", "rank_zero_info", "rank_zero_warn"]


def namespace_of(trainer: Any) -> str:
    """``"lightning.pytorch"`` or ``"pytorch_lightning"``: the package the Trainer comes from."""
    module = type(trainer).__module__
    return "lightning.pytorch" if module == "lightning" or module.startswith("lightning.") else "pytorch_lightning"


def bind(trainer: Any) -> None:
    """Take the rank from ``trainer`` and log reports where its namespace logs its own."""
    set_rank(int(getattr(trainer, "global_rank", 0) or 0))
    set_logger(f"{namespace_of(trainer)}.utilities.rank_zero")

