"""What the engine reads of the training loop around it, as plain values: the :class:`LoopView`.

Each adapter builds one per hook from its own loop (``SMDCallback`` from the Lightning Trainer,
``SMDMonitor`` from its arguments and counters) and hands it to the engine; the parts read the view
(or the plain values in it), never a Trainer. Lightning-only knowledge (strategies, precision
plugins, loggers, ``fit_loop``) stays in the adapter that fills the view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

__all__ = ["FitHorizon", "LoopView", "ScheduledLR", "no_broadcast"]


def no_broadcast(obj: Any, src: int = 0) -> Any:
    """One process: broadcasting from rank ``src`` is the identity."""
    return obj


@dataclass
class ScheduledLR:
    """An LR scheduler and when the loop steps it (Lightning's ``LRSchedulerConfig`` fields the plan reads)."""

    scheduler: Any
    interval: str = "step"  # "step": once per optimizer step, "epoch": once per epoch
    frequency: int = 1
    reduce_on_plateau: bool = False
    monitor: str | None = None
    strict: bool = True
    name: str | None = None


@dataclass
class FitHorizon:
    """What the fit-start plan needs besides the optimizers: the schedulers and how long the run is."""

    schedulers: list[ScheduledLR] = field(default_factory=list)
    max_steps: int = -1  # -1: not bounded by steps
    max_epochs: int | None = None
    batches_per_epoch: float = float("inf")
    accumulate_grad_batches: int = 1
    automatic_optimization: bool = True  # False: the model steps its schedulers itself (unpredictable)
    keep: tuple[Any, ...] = ()  # objects the scheduler copies must share, not copy (the trainer, the module)


@dataclass
class LoopView:
    """The training loop as the engine sees it at one hook.

    Attributes:
        optimizers: the optimizers whose steps are measured, in the loop's order.
        model: the module whose parameters they train (metric names are its parameter names).
        global_step: ``step()`` calls of the optimizers so far (Lightning's ``trainer.global_step``).
        log_step: the step on the logging axis (Lightning's ``_batches_that_stepped``).
        log_every_n_steps: the loop's cadence, used when the engine was given none.
        global_rank, world_size: this process in the job.
        broadcast: ``broadcast(obj, src)`` of a picklable object from rank ``src`` to every rank.
        flat_shards: parameters are 1-D views of each rank's flat shard (FSDP1 with
            ``use_orig_params=True``): every rank holds part of each sum.
        process_group: the process group those partial sums are reduced over (``None``: the world).
        grad_scaler: the enabled ``GradScaler`` of a mixed-precision loop, else ``None``.
        precision: the precision setting (``"32-true"``, ``"16-mixed"``, ``"bf16-true"``, ...).
        averaged_models: objects that may hold EMA/SWA copies (an ``_average_model`` attribute),
            rescaled with the weights.
        horizon: the schedulers and the run's length, for the plan (only at train start).
    """

    optimizers: Sequence[torch.optim.Optimizer]
    model: torch.nn.Module | None
    global_step: int = 0
    log_step: int = 0
    log_every_n_steps: int = 50
    global_rank: int = 0
    world_size: int = 1
    broadcast: Callable[[Any, int], Any] = no_broadcast
    flat_shards: bool = False
    process_group: Any = None
    grad_scaler: Any = None
    precision: str = "32-true"
    averaged_models: Sequence[Any] = ()
    horizon: FitHorizon | None = None

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0
