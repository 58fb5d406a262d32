"""Warnings and reports of the engine, on rank 0 only.

The adapter sets the rank (``SMDCallback`` from its Trainer at ``setup``) and the
logger reports go to (Lightning's ``rank_zero`` logger of the Trainer's namespace, so reports show
where Lightning's own do).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

__all__ = ["rank_zero_info", "rank_zero_warn", "set_logger", "set_rank"]

_state = {"rank": 0, "logger": "pytorch_lightning.utilities.rank_zero"}


def set_rank(rank: int) -> None:
    _state["rank"] = int(rank or 0)


def set_logger(name: str) -> None:
    _state["logger"] = name


def rank_zero_warn(message: str, stacklevel: int = 4, **kwargs: Any) -> None:
    if _state["rank"] == 0:
        warnings.warn(message, stacklevel=stacklevel, **kwargs)


def rank_zero_info(message: str, stacklevel: int = 4, **kwargs: Any) -> None:
    if _state["rank"] == 0:
        logging.getLogger(_state["logger"]).info(message, stacklevel=stacklevel, **kwargs)
