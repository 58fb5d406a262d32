"""``SMDCallback``: Lightning's hooks turned into the engine's operations, results published through the Trainer.

The data flow of one step, and what each part does, is in ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from lightning_smd.lightning import arguments, namespace
from lightning_smd.lightning.namespace import rank_zero_warn
from lightning_smd.lightning.publish import Publisher, check_writable
from lightning_smd.lightning.view import check_supported, view_of
from lightning_smd.report import wandb_extras
from lightning_smd.report.history import History
from lightning_smd.core.channels import ChannelMetrics
from lightning_smd.core.detect import Candidate
from lightning_smd.core.engine import SMDEngine
from lightning_smd.core.equilibrium import EquilibriumTracker
from lightning_smd.core.estimates import RunningMean
from lightning_smd.core.options import DetectionOptions, EquilibriumOptions, EstimateOptions, RescaleMode
from lightning_smd.core.plan import Plan
from lightning_smd.core.rescale import RescalePolicy
from lightning_smd.core.steps import StepRecorder
from lightning_smd.core.tracking import TrackedSet
from lightning_smd.core.units import Unit

if TYPE_CHECKING:
    import pytorch_lightning as pl

#: the full per-tensor detection table, written next to the figures
TENSORS_FILE = "smd_tensors.txt"

__all__ = ["SMDCallback"]

DEFAULT_CHANNEL_EVERY = 1  # per_channel=True: per-unit statistics on every measured step (they come from the same row sums)
NameFilter = str | Sequence[str] | Callable[[str], bool] | None


def _callback_base() -> type:
    """Lightning's ``Callback``: ``pytorch_lightning``'s, else ``lightning.pytorch``'s (a Trainer of
    either namespace calls the hooks of both). Without Lightning, ``object``: the module still imports."""
    for name in ("pytorch_lightning", "lightning.pytorch"):
        try:
            return importlib.import_module(name).Callback
        except ImportError:
            continue
    return object


class SMDCallback(_callback_base()):
    """Measure (and optionally control) the Spherical Motion Dynamics of a normalized network.

    For every scale-invariant weight tensor (detected automatically: conv/linear feeding a
    normalization, weight-standardized or weight-normalized weights, and tensors invariant
    through functional code), logs through every logger of the Trainer, every
    ``log_every_n_steps`` optimizer steps, with Lightning's own step axis:

    * ``smd/angular_update/{name}``: the angle Δ_t (radians) the step turned the tensor by,
    * ``smd/angular_update_theory/{name}``: Δ* from the tensor's param group at that step,
    * ``smd/weight_norm/{name}`` and ``smd/weight_norm_theory/{name}``: ‖w_t‖ and the predicted
      equilibrium ‖w*‖ (SGD / SGD with momentum) from a running estimate of the unit gradient,
    * ``smd/unit_grad_sq/{name}``: that running estimate of L,
    * ``smd/angular_update_ratio/{mean,min,max}``: Δ_t/Δ* across tensors,
    * ``smd/equilibrium/fraction``, ``smd/equilibrium_step/{name}``,
      ``smd/steps_to_equilibrium/{predicted/<group>,measured/<name>}``: equilibrium tracking,
    * ``smd/rescale_factor``: at each rescale, the factor the weights were multiplied by.

    Args:
        log_every_n_steps: measure and log every this many optimizer steps (1 = every step);
            ``None`` uses the Trainer's ``log_every_n_steps``. Unmeasured steps cost nothing.
        rescale: ``False`` (monitor only); ``True`` or ``"drop"``: when a param group's (η, λ)
            drops by at least ``RescalePolicy.min_drop`` (2), multiply its scale-invariant tensors by
            ((η'λ)/(ηλ'))^e before the next step (e = 1/4 for SGD/SGDM/Nesterov, 1/2 for
            AdamW/Lion/Muon: the factor that keeps Δ_t/Δ*); ``"continuous"``: on every change (cosine-like
            schedules), with η floored at ``RescalePolicy.min_lr_ratio`` × its peak; ``"equilibrium"``: at the
            same changes as ``"drop"``, move each tensor to its own predicted new equilibrium norm
            ‖w*'‖ (from the running L; AdamW/Lion/Muon: from the measured update RMS), which puts Δ_t at
            the new Δ* also when the weights were not at equilibrium before (k^(-e) keeps the
            ratio Δ_t/Δ*). Any rescale while the window mean of Δ_t/Δ* is outside ±30 % warns.
            A :class:`~lightning_smd.RescalePolicy` sets the mode and its thresholds:
            ``rescale=RescalePolicy("drop", min_drop=4.0)``, ``RescalePolicy(on_increase=True)``
            (the mode names above are its default policies).
        warm_start: ``True``: once, after enough steps for a stable L estimate (detection, then 32
            samples of L: ``detection.steps + 1 + 32·max(log_every_n_steps, estimates.unit_grad_every)``,
            printed at train start), set every tracked tensor's norm to its predicted equilibrium ‖w*‖
            (weights and optimizer state, like a rescale; exactly once across resume). An int: that
            step. Initialization acts only through the transient towards equilibrium (NRQ paper,
            Cor. 3), so this removes the transient.
        warmup_steps: ``None``: an LR that only rises from the start of training is a warm-up
            (recognized from the LR each step, see :mod:`lightning_smd.core.plan.warmup`); an int N: the
            LR changes at optimizer steps ≤ N are the warm-up; ``0``: no warm-up. A warm-up is one
            stage with the plateau it climbs to: no stage, no predicted steps to equilibrium and
            no rescale during it; equilibrium is judged from its end.
        include, exclude: regex, list of regexes or ``callable(name) -> bool`` over parameter names,
            applied after detection.
        per_channel: also measure every tensor per invariance unit (output channel under
            BatchNorm, channel group under GroupNorm, head under a per-head norm; see
            ``docs/per_channel.md``), from the same reads: ``smd/channel/...`` percentiles, stalled
            fractions, histograms (TensorBoard, W&B; at most one set per 50 steps) and figures.
            ``True``: on every measured step (the per-tensor sums are sums of the per-unit ones,
            so the units cost no extra read); an int ``N``: on the measured step ending each block
            of ``N`` optimizer steps.
        figures_dir: where figures go; default ``<trainer.log_dir or default_root_dir>/smd``.
        figures_every_n_steps: also render the figures periodically (rank 0); they are always
            rendered at the end of fit.
        verbose: print the detection report (and the equilibrium summary at the end) on rank 0:
            ``True`` (or 1) grouped by stage of the network, with counts (a screen, whatever the
            model); ``2`` one row per tensor, and the plan's column legend; ``False`` nothing. The
            per-tensor table is also written to ``<figures dir>/smd_tensors.txt``.
        detection: :class:`~lightning_smd.DetectionOptions`, how the scale-invariant tensors are
            found: ``mode`` (``"auto"``: structural candidates confirmed numerically, plus tensors
            found numerically; ``"structural"``; ``"numerical"``), ``steps`` (3: optimizer steps,
            after the first update, over which the radial cosine |⟨g, w⟩|/(‖g‖‖w‖) is checked) and
            ``radial_threshold`` (1e-4: the cosine under which a tensor is numerically invariant).
        estimates: :class:`~lightning_smd.EstimateOptions`, the running estimate of L:
            ``ema_steps`` (200: its time constant in optimizer steps) and ``unit_grad_every``
            (8: sample L at most every this many steps, the first measured step of each block;
            measuring every step then skips the gradient reads in between).
        equilibrium: :class:`~lightning_smd.EquilibriumOptions`: equilibrium is reached when the
            mean of Δ_t/Δ* over ``window`` (200) steps is within ``tolerance`` (0.1) of 1.

    The grouped options are frozen dataclasses, each validating its fields when built
    (``EquilibriumOptions(window=0)`` raises, naming ``EquilibriumOptions(window=...)``); every
    other bad value is refused here, naming the argument (``SMDCallback(rescale=...)``).
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        rescale: bool | RescaleMode | RescalePolicy = False,
        warm_start: bool | int = False,
        warmup_steps: int | None = None,
        include: NameFilter = None,
        exclude: NameFilter = None,
        per_channel: bool | int = True,
        figures_dir: str | os.PathLike[str] | None = None,
        figures_every_n_steps: int | None = None,
        verbose: bool | int = True,
        *,
        detection: DetectionOptions = DetectionOptions(),
        estimates: EstimateOptions = EstimateOptions(),
        equilibrium: EquilibriumOptions = EquilibriumOptions(),
    ) -> None:
        given = dict(
            log_every_n_steps=log_every_n_steps, rescale=rescale, warm_start=warm_start, warmup_steps=warmup_steps,
            include=include, exclude=exclude, per_channel=per_channel, figures_dir=figures_dir,
            figures_every_n_steps=figures_every_n_steps, verbose=verbose,
            detection=detection, estimates=estimates, equilibrium=equilibrium,
        )
        arguments.validate(given, self._owner)
        self._fit_of: tuple[Any, Any] | None = None  # weak references: the Trainer and module of the last fit
        self._continuing = False
        self._arguments = arguments.record(given)  # what a resume compares with the checkpointed run's
        self.log_every_n_steps = log_every_n_steps
        self.rescale = rescale.mode if isinstance(rescale, RescalePolicy) else rescale  # the plan's setting
        self.policy = arguments.rescale_policy(rescale)
        self.include, self.exclude, self.detect = include, exclude, detection.mode
        self.unit_grad_every = estimates.unit_grad_every
        self.detect_steps = detection.steps
        self.radial_threshold = detection.radial_threshold
        self.figures_every_n_steps = figures_every_n_steps
        self.verbose = verbose
        self._figures_dir = figures_dir
        # per_channel=True: units on every measured step, histograms once per 50 steps; N: both every N
        self._histogram_every = 50 if isinstance(per_channel, bool) else per_channel
        self.per_channel = per_channel is not False
        # per-unit statistics on the measured step that ends each block of this many steps
        self.channel_every = DEFAULT_CHANNEL_EVERY if isinstance(per_channel, bool) else per_channel
        self.rescale_min_drop = self.policy.min_drop if self.policy is not None else RescalePolicy.min_drop
        # the engine (lightning_smd/core/engine.py): the parts, their state and torch's step hooks;
        # this class turns Lightning's hooks into its operations and publishes through the Trainer
        self._engine = SMDEngine.from_options(self._owner, given, self._arguments, self.policy, publish=self._publish)
        self._trainer: pl.Trainer | None = None  # the Trainer of the fit under way (for torch's step hooks)
        self._publisher = Publisher(self._figures_dir, self._engine.channels, self._histogram_every)

    def _start_fresh(self) -> None:
        """A new run: the engine's state reset, its parts and the records made anew."""
        self._engine.start_fresh()
        self._publisher = Publisher(self._figures_dir, self._engine.channels, self._histogram_every)

    #: the name errors give the constructor
    _owner = "SMDCallback"

    @property
    def state_key(self) -> str:
        # By class only: a resume with other arguments must still find (and restore) this state.
        # It also makes Lightning refuse a second instance when the Trainer is built.
        return type(self).__qualname__

    # ------------------------------------------------------------ what users read
    @property
    def candidates(self) -> dict[str, Candidate]:
        """The scale-invariant tensors tracked, name → why (empty until detection decided)."""
        return self._engine.candidates

    @property
    def units(self) -> dict[str, Unit]:
        """per_channel: each tracked tensor's invariance unit."""
        return self._engine.units

    @property
    def unit_grad(self) -> RunningMean:
        """The running estimate of L per tensor."""
        return self._engine.unit_grad

    @property
    def equilibrium(self) -> EquilibriumTracker:
        """The LR stages and when each tensor reached equilibrium in them."""
        return self._engine.equilibrium

    @property
    def channels(self) -> ChannelMetrics | None:
        return self._engine.channels

    @property
    def records(self) -> History:
        """Everything logged so far on rank 0, as ``(step, metrics)`` records."""
        return self._publisher.records

    @property
    def rescale_events(self) -> list[dict[str, Any]]:
        """One dict per rescale applied: step, group, factor, lr/weight decay before and after."""
        return self._engine.rescale_events

    @property
    def plan(self) -> Plan | None:
        """The LR stages of the fit, predicted at train start (rank 0), or ``None``."""
        return self._engine.plan

    @property
    def detection_text(self) -> str | None:
        """The detection report (which tensors are tracked, and why), once decided (rank 0)."""
        return self._engine.detection_text

    @property
    def skipped_steps(self) -> int:
        """Measured steps the GradScaler skipped (not logged)."""
        return self._engine.skipped_steps

    @property
    def figures_dir(self) -> str | None:
        return self._publisher.figures_dir

    @property
    def _tracked(self) -> TrackedSet | None:
        return self._engine.tracked

    @property
    def _measurer(self) -> StepRecorder | None:
        return self._engine.measurer

    def figures_path(self, trainer: pl.Trainer) -> Path:
        """Where the figures are written."""
        return self._publisher.figures_path(trainer)

    def _publish(self, metrics: dict[str, float], step: int) -> None:
        if self._trainer is not None:
            self._publisher.log(self._trainer, metrics, step)

    def _view(self) -> Any:
        """The engine's view of the fit under way, built inside torch's step hooks."""
        return view_of(self._trainer)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Before a checkpoint is restored: a new Trainer or model starts fresh (nothing of the last
        # run carries over: its LR, stages, records); the same Trainer and model again (trainer.fit
        # to train longer) continues, without a second detection.
        last = self._fit_of
        self._continuing = last is not None and last[0]() is trainer and last[1]() is pl_module
        if last is not None and not self._continuing:
            self._start_fresh()
        self._fit_of = (weakref.ref(trainer), weakref.ref(pl_module))
        namespace.bind(trainer)  # pytorch_lightning or lightning.pytorch: the rank from this Trainer
        others = [cb for cb in trainer.callbacks if isinstance(cb, SMDCallback) and cb is not self]
        if others:
            raise ValueError(
                f"SMDCallback: found two SMDCallback instances in the Trainer's callbacks ({len(others) + 1} in all). "
                "Both would measure (twice the cost) and, with rescale, both would rescale at an LR drop "
                "(weights × k^(-2e) instead of k^(-e)). Keep one SMDCallback."
            )
        if self.figures_dir is not None and trainer.is_global_zero and self._publisher.writes_files(trainer):
            check_writable(self.figures_dir, f"{self._owner}(figures_dir=...)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_supported(trainer, self._owner)
        self._trainer = trainer
        self._engine.fit_start(view_of(trainer), self._view, continuing=self._continuing)
        if trainer.is_global_zero:
            wandb_extras.setup(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plan = self._engine.train_start(view_of(trainer, horizon=True))
        if plan is None:
            return
        if (plan_csv := self._publisher.plan_path(trainer)) is not None:
            plan.write_csv(plan_csv)
        wandb_extras.log_plan_table(trainer, plan.rows(), trainer.global_step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._engine.batch_start(view_of(trainer))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._engine.before_backward()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._engine.end()
        self._trainer = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._engine.remove_hooks()
        self._trainer = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        view = view_of(trainer)
        decision = self._engine.before_optimizer_step(view, optimizer)
        if decision is not None:
            self._engine.report_detection(view, decision, self._table_path(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        view = view_of(trainer)
        steps = self._engine.batch_end(view)
        if steps and self.figures_every_n_steps and (steps[-1] + 1) % self.figures_every_n_steps < self._engine.every(view):
            self._publisher.render_figures(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._engine.train_end(view_of(trainer))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._engine.fit_end(view_of(trainer))
        if trainer.is_global_zero and self.records:
            self._publisher.render_figures(trainer, summary_table=True)

    def _table_path(self, trainer: pl.Trainer) -> Path | None:
        """Where the per-tensor detection table goes: next to the figures; nothing under
        ``fast_dev_run`` (its DummyLogger), nor in the working directory of a logger-less run."""
        if trainer.is_global_zero and self._publisher.writes_files(trainer) and (self.figures_dir is not None or trainer.loggers):
            return self.figures_path(trainer) / TENSORS_FILE
        return None

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The :class:`~lightning_smd.core.state.SMDState`'s: everything a resume needs (also taken
        while detection has not decided: the resumed run goes on with its evidence)."""
        return self._engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._engine.load_state_dict(state_dict)
        if changed := arguments.changes(state_dict.get("arguments") or {}, self._arguments):
            rank_zero_warn(
                f"{self._owner}: resumed with other arguments than the checkpointed run: " + ", ".join(changed) + ". "
                "Restored all the same: the tracked tensors, the running L, the equilibrium stages and the rescale "
                "history (a rescale is neither repeated nor skipped)."
            )
