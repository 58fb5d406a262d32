"""``SMDMonitor``: the SMD measurement for any training loop (plain PyTorch, Lightning Fabric, other trainers).

It hooks onto the model's forward (the first one is recorded for detection) and onto every
optimizer's own ``step()`` (torch's step pre/post hooks), and gives the same metric keys as
:class:`~lightning_smd.SMDCallback` through :meth:`SMDMonitor.pop_metrics`::

    monitor = SMDMonitor(model, optimizer)          # or a list of optimizers
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward(); optimizer.step(); optimizer.zero_grad(); scheduler.step()
        for step, metrics in monitor.pop_metrics().items():
            my_logger.log(metrics, step=step)
    torch.save(monitor.state_dict(), path)          # resume: SMDMonitor(...).load_state_dict(...)
    monitor.close()                                 # removes every hook

How it is built (this round): the monitor drives the same engine as the callback, through the
callback's steps, with a small stand-in for the few things the engine reads from a Trainer (the
optimizers, the rank, a step counter, where metrics go). One *iteration* starts at the first forward
of the model after an optimizer stepped (or at the first step); its step on the logging axis is the
number of earlier iterations in which an optimizer stepped, Lightning's ``_batches_that_stepped``.
With one optimizer stepping once per iteration it is that optimizer's step count (0-based), the
step axis of Lightning's loggers and of ``LearningRateMonitor``.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lightning_smd.core.steps import StepHooks
from lightning_smd.lightning.callback import SMDCallback

__all__ = ["SMDMonitor"]


class _Engine(SMDCallback):
    """The engine the monitor drives: the callback's parts and steps, its errors naming ``SMDMonitor``."""

    _owner = "SMDMonitor"


class _Collector:
    """Where the engine's metrics go: ``{step: {key: value}}`` until :meth:`SMDMonitor.pop_metrics`."""

    save_dir = None
    log_dir = None

    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.setdefault(int(step), {}).update(metrics)


class _Strategy:
    """One process, or the default process group a plain DDP loop set up."""

    process_group = None

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


class _Loop:
    """What the engine reads of the training loop (a Trainer's names, plain values)."""

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], log_every_n_steps: int,
                 grad_scaler: Any | None, schedulers: list[Any], total_steps: int | None, root: str) -> None:
        self.optimizers = optimizers
        self.lightning_module = model
        self.strategy = _Strategy()
        self.loggers = [_Collector()]
        self.callbacks: list[Any] = []
        self.log_every_n_steps = log_every_n_steps
        self.precision_plugin = SimpleNamespace(scaler=grad_scaler)
        self.precision = _precision(model, grad_scaler)
        self.default_root_dir = root
        self.fast_dev_run = False
        self.global_step = 0  # step() calls of every optimizer so far
        self._batches_that_stepped = 0  # the logging axis
        self.fit_loop = SimpleNamespace(epoch_loop=self)
        # the plan: the schedulers as step-interval ones, stepped once per iteration
        self.lr_scheduler_configs = [SimpleNamespace(scheduler=s, interval="step", frequency=1, monitor=None,
                                                     strict=True, name=None, reduce_on_plateau=False) for s in schedulers]
        self.max_steps = total_steps if total_steps is not None else -1
        self.max_epochs = None
        self.accumulate_grad_batches = 1
        self.num_training_batches = math.inf

    @property
    def global_rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _precision(model: nn.Module, grad_scaler: Any | None) -> str:
    dtypes = {p.dtype for p in model.parameters()}
    if torch.bfloat16 in dtypes:
        return "bf16-true"
    if torch.float16 in dtypes:
        return "16-true"
    return "16-mixed" if grad_scaler is not None else "32-true"


class SMDMonitor:
    """Measure (and optionally control) the Spherical Motion Dynamics of ``model`` in any loop.

    Args:
        model: the ``nn.Module`` whose parameters the optimizers train (or what ``fabric.setup``
            returned); metric names are its parameter names (``smd/angular_update/{name}``, ...).
        optimizers: one optimizer or a list (Fabric's wrapped ones too).
        schedulers: the LR schedulers (stepped once per iteration), for the fit-start plan
            (:attr:`plan`, :meth:`plan_text`); with ``total_steps``.
        total_steps: the optimizer steps the run will take (the plan's horizon).
        grad_scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop, if any.
        **options: every option of :class:`~lightning_smd.SMDCallback` (``rescale``,
            ``log_every_n_steps`` (default 50), ``per_channel``, ``include``, ...).
    """

    def __init__(self, model: nn.Module, optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], *,
                 schedulers: Any | Sequence[Any] | None = None, total_steps: int | None = None,
                 grad_scaler: Any | None = None, **options: Any) -> None:
        # Lightning Fabric's wrappers: the user's module (its names; its forward runs inside the
        # wrapper's) and the torch optimizer (the wrapper's step() calls it)
        model = getattr(model, "_original_module", model)
        if not isinstance(optimizers, (list, tuple)):
            optimizers = [optimizers]
        optimizers = [o.optimizer if isinstance(getattr(o, "optimizer", None), torch.optim.Optimizer) else o
                      for o in optimizers]
        if not isinstance(model, nn.Module):
            raise TypeError(f"SMDMonitor(model=...): expected a torch.nn.Module, got {type(model).__name__}")
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise TypeError("SMDMonitor(optimizers=...): expected a torch.optim.Optimizer or a list of them")
        if schedulers is not None and not isinstance(schedulers, (list, tuple)):
            schedulers = [schedulers]
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"SMDMonitor(total_steps={total_steps!r}): expected a positive int")
        known = set(inspect.signature(SMDCallback.__init__).parameters) - {"self"}
        if unknown := sorted(set(options) - known):
            raise TypeError(f"SMDMonitor: unknown option(s) {unknown}; the options are SMDCallback's: {sorted(known)}")
        self._callback = _Engine(**options)
        every = self._callback.log_every_n_steps or 50
        self._loop = _Loop(model, optimizers, every, grad_scaler, list(schedulers or []), total_steps, os.getcwd())
        self._loop.callbacks = [self._callback]
        self._model = model
        self._open = False  # an iteration is under way
        self._stepped = False  # an optimizer stepped in it
        self._first_forward_done = False
        # registered before the callback's own step hooks: they run first (around the closure too)
        self._hooks = StepHooks(optimizers, self._before_step, self._after_step)
        self._callback.setup(self._loop, model, "fit")
        self._callback.on_fit_start(self._loop, model)
        self._callback.schedule.resolve_warm_start(every, self._callback.unit_grad_every)
        if schedulers and total_steps:
            from lightning_smd.core.plan import plan_from_trainer

            self._callback.plan = plan_from_trainer(self._loop, rescale=self._callback.rescale,
                                                    min_drop=self._callback.rescale_min_drop)
        self._begin_iteration()  # the first forward is recorded (detection)
        # after the recorder's own hooks: the post-hook that stops it runs last in that forward
        self._forward_hooks = [model.register_forward_pre_hook(self._before_forward),
                               model.register_forward_hook(self._after_forward)]

    # ------------------------------------------------------------------ results
    def pop_metrics(self) -> dict[int, dict[str, float]]:
        """``{step: {smd/* key: value}}`` measured since the last call (rank 0; empty elsewhere)."""
        if self._open and self._stepped:
            self._end_iteration()
        collector = self._loop.loggers[0]
        out, collector.metrics = collector.metrics, {}
        return out

    @property
    def candidates(self) -> dict[str, Any]:
        """The scale-invariant tensors found by detection, ``name → Candidate`` (empty until decided)."""
        return self._callback.candidates

    @property
    def plan(self) -> Any:
        """The LR stages of the run (given ``schedulers`` and ``total_steps``), or ``None``."""
        return self._callback.plan

    @property
    def records(self) -> Any:
        """Everything measured so far, as ``(step, metrics)`` records (the figures' input)."""
        return self._callback.records

    @property
    def rescale_events(self) -> list[dict[str, Any]]:
        return self._callback.rescale_events

    def detection_report(self) -> str | None:
        """The detection table (which tensors are tracked, and why), once detection decided."""
        return self._callback.detection_text

    def plan_text(self) -> str | None:
        return self._callback.plan.format() if self._callback.plan is not None else None

    def equilibrium_summary(self) -> str | None:
        equilibrium = self._callback.equilibrium
        return equilibrium.summary() if equilibrium.stages else None

    def save_figures(self, directory: str | Path) -> dict[str, Path]:
        """Render the figures of everything measured so far into ``directory`` (the report package's)."""
        from lightning_smd.report import channel_figures, figures
        from lightning_smd.report.series import RunSeries

        written = figures.save_figures(RunSeries.from_records(self.records), directory)
        written.update(channel_figures.save_channel_figures(self._callback.channels, Path(directory)))
        return written

    # --------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (plain data: ``torch.load(weights_only=True)`` reads it): the
        :class:`~lightning_smd.core.state.SMDState` under ``"smd"`` (also while detection has not
        decided: the resumed loop decides on the same evidence at the same step) and the step counters."""
        return {"smd": self._callback.state_dict(), "global_step": self._loop.global_step,
                "log_step": self._loop._batches_that_stepped + (1 if self._open and self._stepped else 0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a run: the tracked tensors, running estimates, equilibrium stages and rescale
        history; call before the first step of the resumed loop."""
        self._callback.load_state_dict(state["smd"])
        self._loop.global_step = int(state["global_step"])
        self._loop._batches_that_stepped = int(state["log_step"])
        self._callback.detection.stop_recording()
        self._open, self._stepped = False, False
        self._begin_iteration()  # restores the tracked tensors (no detection)

    def close(self) -> None:
        """End the run: warn about rescales still owed, remove every hook."""
        if self._open and self._stepped:
            self._end_iteration()
        self._callback.detection.stop_recording()
        self._callback.on_train_end(self._loop, self._model)
        self._hooks.remove()
        for handle in self._forward_hooks:
            handle.remove()
        self._forward_hooks = []
        self._callback.teardown(self._loop, self._model, "fit")  # the engine's step hooks

    # ------------------------------------------------------------------ hooks
    def _begin_iteration(self) -> None:
        self._callback.on_train_batch_start(self._loop, self._model, None, 0)
        self._open, self._stepped = True, False

    def _end_iteration(self) -> None:
        self._callback.on_train_batch_end(self._loop, self._model, None, None, 0)
        self._loop._batches_that_stepped += 1
        self._open, self._stepped = False, False

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if self._open and self._stepped:
            self._end_iteration()
        if not self._open:
            self._begin_iteration()

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._first_forward_done:
            self._first_forward_done = True
            self._callback.on_before_backward(self._loop, self._model, None)

    def _before_step(self, optimizer: torch.optim.Optimizer, kwargs: dict) -> None:
        if not self._open:
            self._begin_iteration()
        if not self._first_forward_done:
            self._first_forward_done = True
            self._callback.on_before_backward(self._loop, self._model, None)
        self._callback.on_before_optimizer_step(self._loop, self._model, optimizer)

    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._loop.global_step += 1
        self._stepped = True
