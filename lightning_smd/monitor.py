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

How it is built: the monitor is the second adapter of the engine (:class:`~lightning_smd.core.engine.SMDEngine`,
which :class:`~lightning_smd.SMDCallback` drives from Lightning's hooks): at each of its hooks it
builds the engine's :class:`~lightning_smd.core.loop.LoopView` from its own arguments and counters
(the optimizers, the rank and broadcast of ``torch.distributed``, the grad scaler, the schedulers)
and calls the engine's operation. One *iteration* starts at the first forward
of the model after an optimizer stepped (or at the first step); its step on the logging axis is the
number of earlier iterations in which an optimizer stepped, Lightning's ``_batches_that_stepped``.
With one optimizer stepping once per iteration it is that optimizer's step count (0-based), the
step axis of Lightning's loggers and of ``LearningRateMonitor``.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lightning_smd.core.engine import SMDEngine
from lightning_smd.core.loop import FitHorizon, LoopView, ScheduledLR
from lightning_smd.core.distributed import check_flat_parameters
from lightning_smd.core.messages import rank_zero_warn, set_logger, set_rank
from lightning_smd.core.steps import StepHooks
from lightning_smd.report.history import History

__all__ = ["SMDMonitor"]

#: the full per-tensor detection table, written next to the figures
TENSORS_FILE = "smd_tensors.txt"
OWNER = "SMDMonitor"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _broadcast(obj: Any, src: int = 0) -> Any:
    """One process, or the default process group a plain DDP loop set up."""
    if not _distributed() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _precision(model: nn.Module, grad_scaler: Any | None) -> str:
    dtypes = {p.dtype for p in model.parameters()}
    if torch.bfloat16 in dtypes:
        return "bf16-true"
    if torch.float16 in dtypes:
        return "16-true"
    return "16-mixed" if grad_scaler is not None else "32-true"


def _options() -> dict[str, inspect.Parameter]:
    """The options: ``SMDCallback``'s constructor arguments (one signature for both adapters; where
    Lightning is installed, reading it imports Lightning, whose ``Callback`` is the class's base)."""
    from lightning_smd.lightning.callback import SMDCallback

    return {n: p for n, p in inspect.signature(SMDCallback.__init__).parameters.items() if n != "self"}


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
        known = _options()
        if unknown := sorted(set(options) - set(known)):
            raise TypeError(f"SMDMonitor: unknown option(s) {unknown}; the options are SMDCallback's: {sorted(known)}")
        given = {n: options.get(n, p.default) for n, p in known.items()}
        from lightning_smd.lightning import arguments  # plain Python: the options' rules, shared with the callback

        arguments.validate(given, OWNER)
        self._arguments = arguments.record(given)
        self._engine = SMDEngine.from_options(OWNER, given, self._arguments, arguments.rescale_policy(given["rescale"]),
                                              publish=self._publish)
        self._every = given["log_every_n_steps"] or 50
        self._figures_dir = given["figures_dir"]
        self._figures_every = given["figures_every_n_steps"]
        self._records = History()
        self._metrics: dict[int, dict[str, float]] = {}
        self._model = model
        self._optimizers = optimizers
        self._grad_scaler = grad_scaler
        self._precision = _precision(model, grad_scaler)
        self._horizon = (FitHorizon([ScheduledLR(s) for s in schedulers], max_steps=total_steps, keep=(model,))
                         if schedulers and total_steps else None)
        self._global_step = 0  # step() calls of every optimizer so far
        self._log_step = 0  # the logging axis: iterations in which an optimizer stepped
        self._open = False  # an iteration is under way
        self._stepped = False  # an optimizer stepped in it
        self._first_forward_done = False
        set_rank(self._rank())
        set_logger("pytorch_lightning.utilities.rank_zero")  # where Lightning users look for reports
        if self._figures_dir is not None and self._rank() == 0:
            from lightning_smd.lightning.publish import check_writable

            check_writable(self._figures_dir, f"{OWNER}(figures_dir=...)")
        check_flat_parameters(optimizers, OWNER)
        # registered before the engine's own step hooks: they run first (around the closure too)
        self._hooks = StepHooks(optimizers, self._before_step, self._after_step)
        self._engine.fit_start(self._view(), self._view)
        self._engine.train_start(self._view(horizon=True))
        self._begin_iteration()  # the first forward is recorded (detection)
        # after the recorder's own hooks: the post-hook that stops it runs last in that forward
        self._forward_hooks = [model.register_forward_pre_hook(self._before_forward),
                               model.register_forward_hook(self._after_forward)]

    # ------------------------------------------------------------------ the view
    @staticmethod
    def _rank() -> int:
        return dist.get_rank() if _distributed() else 0

    def _view(self, horizon: bool = False) -> LoopView:
        return LoopView(
            optimizers=self._optimizers, model=self._model, global_step=self._global_step, log_step=self._log_step,
            log_every_n_steps=self._every, global_rank=self._rank(),
            world_size=dist.get_world_size() if _distributed() else 1, broadcast=_broadcast,
            grad_scaler=self._grad_scaler if self._grad_scaler is None or self._grad_scaler.is_enabled() else None,
            precision=self._precision, horizon=self._horizon if horizon else None,
        )

    def _publish(self, metrics: dict[str, float], step: int) -> None:
        self._records.append(step, metrics)
        self._metrics.setdefault(int(step), {}).update(metrics)

    # ------------------------------------------------------------------ results
    def pop_metrics(self) -> dict[int, dict[str, float]]:
        """``{step: {smd/* key: value}}`` measured since the last call (rank 0; empty elsewhere)."""
        if self._open and self._stepped:
            self._end_iteration()
        out, self._metrics = self._metrics, {}
        return out

    @property
    def candidates(self) -> dict[str, Any]:
        """The scale-invariant tensors found by detection, ``name → Candidate`` (empty until decided)."""
        return self._engine.candidates

    @property
    def plan(self) -> Any:
        """The LR stages of the run (given ``schedulers`` and ``total_steps``), or ``None``."""
        return self._engine.plan

    @property
    def records(self) -> Any:
        """Everything measured so far, as ``(step, metrics)`` records (the figures' input)."""
        return self._records

    @property
    def rescale_events(self) -> list[dict[str, Any]]:
        """One dict per rescale applied: step, group, factor, lr/weight decay before and after."""
        return self._engine.rescale_events

    @property
    def equilibrium(self) -> Any:
        """The LR stages and when each tensor reached equilibrium in them."""
        return self._engine.equilibrium

    def detection_report(self) -> str | None:
        """The detection table (which tensors are tracked, and why), once detection decided."""
        return self._engine.detection_text

    def plan_text(self) -> str | None:
        return self._engine.plan.format() if self._engine.plan is not None else None

    def equilibrium_summary(self) -> str | None:
        equilibrium = self._engine.equilibrium
        return equilibrium.summary() if equilibrium.stages else None

    def save_figures(self, directory: str | Path) -> dict[str, Path]:
        """Render the figures of everything measured so far into ``directory`` (the report package's)."""
        from lightning_smd.report import channel_figures, figures
        from lightning_smd.report.series import RunSeries

        written = figures.save_figures(RunSeries.from_records(self.records), directory)
        written.update(channel_figures.save_channel_figures(self._engine.channels, Path(directory)))
        return written

    def _figures_path(self) -> Path:
        return Path(self._figures_dir) if self._figures_dir is not None else Path(os.getcwd()) / "smd"

    # --------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (plain data: ``torch.load(weights_only=True)`` reads it): the
        :class:`~lightning_smd.core.state.SMDState` under ``"smd"`` (also while detection has not
        decided: the resumed loop decides on the same evidence at the same step) and the step counters."""
        return {"smd": self._engine.state_dict(), "global_step": self._global_step,
                "log_step": self._log_step + (1 if self._open and self._stepped else 0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a run: the tracked tensors, running estimates, equilibrium stages and rescale
        history; call before the first step of the resumed loop."""
        from lightning_smd.lightning import arguments

        self._engine.load_state_dict(state["smd"])
        if changed := arguments.changes(state["smd"].get("arguments") or {}, self._arguments):
            rank_zero_warn(
                f"{OWNER}: resumed with other arguments than the checkpointed run: " + ", ".join(changed) + ". "
                "Restored all the same: the tracked tensors, the running L, the equilibrium stages and the rescale "
                "history (a rescale is neither repeated nor skipped)."
            )
        self._global_step = int(state["global_step"])
        self._log_step = int(state["log_step"])
        self._engine.before_backward()  # stop the recording of the first forward
        self._open, self._stepped = False, False
        self._begin_iteration()  # restores the tracked tensors (no detection)

    def close(self) -> None:
        """End the run: warn about rescales still owed, remove every hook."""
        if self._open and self._stepped:
            self._end_iteration()
        self._engine.before_backward()
        self._engine.train_end(self._view())
        self._hooks.remove()
        for handle in self._forward_hooks:
            handle.remove()
        self._forward_hooks = []
        self._engine.remove_hooks()

    # ------------------------------------------------------------------ hooks
    def _begin_iteration(self) -> None:
        self._engine.batch_start(self._view())
        self._open, self._stepped = True, False

    def _end_iteration(self) -> None:
        steps = self._engine.batch_end(self._view())
        if steps and self._figures_every and (steps[-1] + 1) % self._figures_every < self._every:
            self.save_figures(self._figures_path())
        self._log_step += 1
        self._open, self._stepped = False, False

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if self._open and self._stepped:
            self._end_iteration()
        if not self._open:
            self._begin_iteration()

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._first_forward_done:
            self._first_forward_done = True
            self._engine.before_backward()

    def _before_step(self, optimizer: torch.optim.Optimizer, kwargs: dict) -> None:
        if not self._open:
            self._begin_iteration()
        if not self._first_forward_done:
            self._first_forward_done = True
            self._engine.before_backward()
        view = self._view()
        decision = self._engine.before_optimizer_step(view, optimizer)
        if decision is not None:
            self._engine.report_detection(view, decision, self._figures_path() / TENSORS_FILE)

    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._global_step += 1
        self._stepped = True
