"""``SMDCallback``: the Lightning hooks, handing each step to detection, the schedule watcher, measurement and logging.

The data flow of one step, and what each part does, is in ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from lightning_smd.lightning.namespace import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_smd.lightning import arguments, namespace
from lightning_smd.report import wandb_extras
from lightning_smd.core.detect import Candidate
from lightning_smd.lightning.detection_session import Decision, DetectionSession, check_filters, detection_report
from lightning_smd.lightning.distributed import check_supported
from lightning_smd.core.equilibrium import EquilibriumTracker
from lightning_smd.core.estimates import RunningMean
from lightning_smd.core.channels import ChannelMetrics
from lightning_smd.report.history import History
from lightning_smd.lightning.metrics import MetricsBuilder
from lightning_smd.core.plan import Plan, plan_from_trainer
from lightning_smd.lightning.publish import Publisher, check_writable
from lightning_smd.core.options import DetectionOptions, EquilibriumOptions, EstimateOptions, RescaleMode
from lightning_smd.core.rescale import RescalePolicy
from lightning_smd.lightning.schedule import ScheduleWatcher, log_step_of
from lightning_smd.core.steps import StepHooks, StepRecorder, found_inf_of, grad_scaler
from lightning_smd.lightning.tracking import Tracked, TrackedSet, param_counts, trainable
from lightning_smd.core.state import SMDState
from lightning_smd.core.units import Unit, invariance_units

if TYPE_CHECKING:
    import pytorch_lightning as pl

#: the full per-tensor detection table, written next to the figures
TENSORS_FILE = "smd_tensors.txt"

__all__ = ["SMDCallback"]

DEFAULT_CHANNEL_EVERY = 1  # per_channel=True: per-unit statistics on every measured step (they come from the same row sums)
NameFilter = str | Sequence[str] | Callable[[str], bool] | None


def _callback_base() -> type:
    """Lightning's ``Callback``: ``pytorch_lightning``'s, else ``lightning.pytorch``'s (a Trainer of
    either namespace calls the hooks of both). Without Lightning, ``object``: the class is then the
    engine :class:`~lightning_smd.SMDMonitor` drives, and nothing here imports Lightning."""
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
        # everything a checkpoint keeps (see docs/architecture.md): the running estimates, stages,
        # the schedule's memory, the tracked tensors, detection's progress
        self._state = SMDState(estimates.ema_steps, equilibrium.tolerance, equilibrium.window, per_channel is not False,
                               warmup_steps, self._arguments)
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
        self._warm_start = warm_start
        self.per_channel = per_channel is not False
        # per-unit statistics on the measured step that ends each block of this many steps
        self.channel_every = DEFAULT_CHANNEL_EVERY if isinstance(per_channel, bool) else per_channel
        self.rescale_min_drop = self.policy.min_drop if self.policy is not None else RescalePolicy.min_drop
        # torch's step hooks on the Trainer's optimizers (fit only); the Trainer they read
        self._hooks: StepHooks | None = None
        self._trainer: pl.Trainer | None = None
        self._start_fresh()

    def _start_fresh(self) -> None:
        """A new run: the state object reset, and the parts of a fit that read it made anew (the
        records, the plan and the report of an earlier fit are dropped)."""
        self._state.reset()
        # the parts (see docs/architecture.md), on the state they read and update
        self.publisher = Publisher(self._figures_dir, self._state.channels, self._histogram_every)
        self.detection = DetectionSession(self._state, self.detect, self.detect_steps, self.radial_threshold,
                                          self.include, self.exclude)
        self.schedule = ScheduleWatcher(self.policy, self._state, self.publisher.log, self.detect_steps,
                                        warm_start=self._warm_start)
        self.metrics = MetricsBuilder(self._state)
        self.detection_text: str | None = None  # the detection report, once decided
        self.skipped_steps = 0  # measured steps the GradScaler skipped (not logged)
        self._trainable: list[Tracked] = []
        self._tracked: TrackedSet | None = None  # None until detection decided
        self.plan: Plan | None = None  # the LR stages of the fit, predicted at train start (rank 0)
        self._param_counts: tuple[int, ...] = ()  # tensors per param group when detection last decided
        self._added_at = 0
        # optimizer id → log step: a measured step Lightning announced (on_before_optimizer_step)
        # and torch has not run yet; left at the batch end, the GradScaler skipped it
        self._due: dict[int, int] = {}

    #: the name errors give the constructor (``SMDMonitor`` sets its own: it takes the same options)
    _owner = "SMDCallback"

    @property
    def state_key(self) -> str:
        # By class only: a resume with other arguments must still find (and restore) this state.
        # It also makes Lightning refuse a second instance when the Trainer is built.
        return type(self).__qualname__

    @property
    def candidates(self) -> dict[str, Candidate]:
        """The scale-invariant tensors tracked, name → why (empty until detection decided)."""
        return self._state.candidates

    @property
    def units(self) -> dict[str, Unit]:
        """per_channel: each tracked tensor's invariance unit."""
        return self._state.units

    @property
    def unit_grad(self) -> RunningMean:
        """The running estimate of L per tensor."""
        return self._state.unit_grad

    @property
    def equilibrium(self) -> EquilibriumTracker:
        """The LR stages and when each tensor reached equilibrium in them."""
        return self._state.equilibrium

    @property
    def channels(self) -> ChannelMetrics | None:
        return self._state.channels

    @property
    def records(self) -> History:
        """Everything logged so far on rank 0, as ``(step, metrics)`` records."""
        return self.publisher.records

    @property
    def rescale_events(self) -> list[dict[str, Any]]:
        """One dict per rescale applied: step, group, factor, lr/weight decay before and after."""
        return self.schedule.rescale_events

    @property
    def figures_dir(self) -> str | None:
        return self.publisher.figures_dir

    @property
    def _measurer(self) -> StepRecorder | None:
        return self._tracked.recorder if self._tracked is not None else None

    def figures_path(self, trainer: pl.Trainer) -> Path:
        """Where the figures are written."""
        return self.publisher.figures_path(trainer)

    def _every(self, trainer: pl.Trainer) -> int:
        return self.log_every_n_steps or max(int(trainer.log_every_n_steps), 1)

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
        if self.figures_dir is not None and trainer.is_global_zero and self.publisher.writes_files(trainer):
            check_writable(self.figures_dir, f"{self._owner}(figures_dir=...)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_supported(trainer)
        self._remove_hooks()
        self._trainer = trainer
        # measured at the step that really happens: after clipping and unscaling, once per step() call
        self._hooks = StepHooks(list(trainer.optimizers), self._before_step, self._after_step)
        self._due = {}
        self._trainable = trainable(trainer, pl_module)
        check_filters([t.name for t in self._trainable], self.include, self.exclude, self._owner)
        self._tracked = None
        if self._continuing and not self.candidates and self._state.pending is None:
            self._state.detection.restored = True  # detection was under way: go on with its evidence
        self.detection.reset(self._trainable)
        if self._continuing and self.candidates and self._state.pending is None:
            self._state.pending = sorted(self.candidates)  # continue tracking them (the resume path)
        if not self._trainable:
            rank_zero_warn("SMDCallback: the optimizers hold no parameters; nothing to measure.")
            self._tracked = TrackedSet(trainer, [], self.unit_grad_every)
        if trainer.is_global_zero:
            wandb_extras.setup(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        warm_at = self.schedule.resolve_warm_start(self._every(trainer), self.unit_grad_every)
        if warm_at is not None and self.verbose and not self.schedule.warm_start_done:
            rank_zero_info(f"SMD: warm start at step {warm_at}: every tracked tensor is then set to its predicted "
                           "equilibrium norm ‖w*‖ from the running L (once).")
        # the schedule through the whole fit, known now (epoch length included); no collective
        if not trainer.is_global_zero:
            return
        try:
            self.plan = plan_from_trainer(trainer, rescale=self.rescale, min_drop=self.rescale_min_drop,
                                          warmup_steps=self.schedule.warmup.warmup_steps)
        except Exception as err:  # a prediction must never stop a training run
            rank_zero_warn(f"SMDCallback: could not plan the LR schedule ({type(err).__name__}: {err}); "
                           "training and measurement go on without a plan.")
            return
        if (plan_csv := self.publisher.plan_path(trainer)) is not None:
            self.plan.write_csv(plan_csv)
        wandb_extras.log_plan_table(trainer, self.plan.rows(), trainer.global_step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._tracked is None and self._state.pending is not None:
            # param groups other callbacks restored in their on_fit_start (e.g. BackboneFinetuning) count too
            self._trainable = trainable(trainer, pl_module)
            decision, missing = self.detection.restore(self._state.pending)
            if missing:
                rank_zero_warn(f"SMDCallback: {len(missing)} tensors tracked before the resume are gone: {missing[:5]}")
            self._state.pending = None
            self._start_tracking(trainer, decision, scale_grads=False)  # at batch start: no gradients yet
            if self._state.detection.restored:  # tensors added later were being decided on: go on
                under_way = set(self._state.detection.names)
                self._added_at = log_step_of(trainer)
                self.detection.reset([t for t in self._trainable if t.name in under_way])
                self.detection.start_recording(pl_module)
        else:
            if self._tracked is not None and param_counts(trainer) != self._param_counts:
                self._detect_added_tensors(trainer, pl_module)
            self.detection.start_recording(pl_module)
        self.schedule.warm_start_if_due(trainer, self._tracked)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.detection.stop_recording()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.detection.stop_recording()
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        self._hooks, self._trainer = None, None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._tracked is None:
            decision = self.detection.step(trainer, optimizer)
            if decision is not None:
                # detection ends in on_before_optimizer_step: gradients exist and must follow the weights
                self._start_tracking(trainer, decision, scale_grads=True)
                self._report_detection(trainer, decision)
            return
        if not self.detection.done:  # tensors added to the optimizers after fit start
            decision = self.detection.step(trainer, optimizer)
            if decision is not None:
                self._add_tracking(trainer, decision)
        log_step = log_step_of(trainer)
        if self._measurer is None or (log_step + 1) % self._every(trainer) != 0:
            return
        if self._tracked.measure_on_all_ranks or trainer.is_global_zero:
            self._due[id(optimizer)] = log_step  # measured by the step hooks, if the step happens

    def _before_step(self, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any]) -> None:
        """torch's step pre-hook: the gradients are final (clipped, unscaled) and the step happens."""
        trainer = self._trainer
        if trainer is None:
            return
        # an (η, λ) change since this optimizer's last step (schedulers, ReduceLROnPlateau, the user):
        # a new equilibrium stage, and the rescale, gradients included
        self.schedule.check(trainer, self._tracked, optimizer)
        log_step = self._due.pop(id(optimizer), None)
        if log_step is not None and self._measurer is not None:
            self._measurer.begin(optimizer, log_step, trainer.global_step, self._every(trainer), grad_scaler(trainer),
                                 found_inf_of(optimizer, kwargs))

    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """torch's step post-hook: finish the measurement on the device (a collective where sharded)."""
        if self._measurer is not None:
            self._measurer.finish(optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._measurer is None:
            return
        if self._due and trainer.is_global_zero:
            self.skipped_steps += 1  # announced, never run: the GradScaler skipped it (inf/NaN gradients)
        self._due = {}
        steps = self._measurer.pop_finished()
        if not trainer.is_global_zero:
            return
        for finished in steps:
            stats, skipped = finished.to_host()
            if skipped:  # a fused optimizer's step the GradScaler skipped: nothing moved, nothing to log
                self.skipped_steps += 1
                continue
            self.publisher.log(trainer, self.metrics.build(stats, finished, self._tracked, finished.step),
                               finished.log_step)
            self.schedule.observe(stats, finished, self._tracked)  # the update RMS of AdamW/Lion tensors
        if steps and self.figures_every_n_steps and (steps[-1].log_step + 1) % self.figures_every_n_steps < self._every(trainer):
            self.publisher.render_figures(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for owed in self.schedule.pending(trainer, self._tracked):
            rank_zero_warn(f"SMDCallback: a rescale was still pending when training ended: {owed}.")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.detection.stop_recording()
        if not trainer.is_global_zero:
            return
        if self.verbose and self.equilibrium.stages and self.candidates:
            rank_zero_info(self.equilibrium.summary())
        if self.records:
            self.publisher.render_figures(trainer, summary_table=True)

    def _report_detection(self, trainer: pl.Trainer, decision: Decision) -> None:
        """Rank 0: the full per-tensor table into ``<figures dir>/smd_tensors.txt``; on the console
        the grouped report (``verbose=True``) or the full table (``verbose=2``), then the plan."""
        if not trainer.is_global_zero:  # formatted where it is shown
            return
        self.detection_text = detection_report(trainer, self._trainable, decision, units=self.units)
        where = None
        # nothing under fast_dev_run (its DummyLogger), nor in the working directory of a logger-less run
        if self.publisher.writes_files(trainer) and (self.figures_dir is not None or trainer.loggers):
            path = self.figures_path(trainer) / TENSORS_FILE
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(self.detection_text + "\n")
                where = f"SMDCallback(verbose=2), and {path}"
            except OSError as err:
                rank_zero_warn(f"SMDCallback: could not write {path}: {err}")
        if not self.verbose:
            return
        full = self.verbose is not True and int(self.verbose) >= 2
        rank_zero_info(detection_report(trainer, self._trainable, decision, units=self.units, full=full,
                                        full_table_at=where or "SMDCallback(verbose=2)"))
        if not decision.chosen:  # nothing to measure: the report said why, once
            return
        if self.plan is not None:
            rank_zero_info(self.plan.format(legend=full))
        if (copied := self._tracked.snapshot_note()):
            rank_zero_info(copied)

    def _start_tracking(self, trainer: pl.Trainer, decision: Decision, scale_grads: bool) -> None:
        self._state.candidates = dict(decision.chosen)
        self._tracked = TrackedSet(trainer, [t for t in self._trainable if t.name in decision.chosen], self.unit_grad_every,
                                   self._unit_counts(trainer), self.channel_every)
        self._param_counts = param_counts(trainer)
        self.schedule.apply_deferred(trainer, self._tracked, scale_grads=scale_grads)

    def _unit_counts(self, trainer: pl.Trainer) -> dict[str, int] | None:
        """per_channel: the invariance units of the chosen tensors, from detection's evidence."""
        if not self.per_channel:
            return None
        derived = invariance_units(trainer.lightning_module, self.candidates)
        # after a resume the candidates' evidence is gone ("restored from checkpoint"): the checkpointed units
        self._state.units = {n: self.units.get(n, u) if self.candidates[n].source == "checkpoint" else u
                             for n, u in derived.items()}
        return {n: u.count for n, u in self.units.items()}

    def _detect_added_tensors(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The optimizers hold more tensors than when detection decided (``add_param_group``, e.g.
        ``BackboneFinetuning`` unfreezing a backbone): detect among the new ones, from this batch on."""
        self._param_counts = param_counts(trainer)
        known = {id(t.param) for t in self._trainable}
        self._trainable = trainable(trainer, pl_module)
        added = [t for t in self._trainable if id(t.param) not in known]
        if added:
            self._added_at = log_step_of(trainer)
            self.detection.reset(added)

    def _add_tracking(self, trainer: pl.Trainer, decision: Decision) -> None:
        """Track the scale-invariant ones among the added tensors from now on, next to the others."""
        self._state.candidates = {**self.candidates, **decision.chosen}
        self._tracked = TrackedSet(trainer, [t for t in self._trainable if t.name in self.candidates], self.unit_grad_every,
                                   self._unit_counts(trainer), self.channel_every)
        step = log_step_of(trainer)
        for group in sorted({g for n, g in zip(self._tracked.names, self._tracked.groups) if n in decision.chosen}):
            if self.equilibrium.current_stage(group) is None:  # a new param group: its first stage starts now
                self.equilibrium.start_stage(group, step, None, False, self._tracked.names_of(group))
        if self.verbose and trainer.is_global_zero:  # formatted where it is shown
            added = self.detection.tracked
            rank_zero_info(
                f"SMD: {len(added)} tensors were added to the optimizers (add_param_group) or unfrozen (requires_grad) "
                f"at step {self._added_at}; "
                f"from step {step} on, the scale-invariant ones among them are tracked too.\n"
                + detection_report(trainer, added, decision)
            )

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The :class:`~lightning_smd.core.state.SMDState`'s: everything a resume needs (also taken
        while detection has not decided: the resumed run goes on with its evidence)."""
        return self._state.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detection.discard_recording()  # a forward recorded before the load is no evidence of this run
        self._state.load_state_dict(state_dict)
        self._tracked = None
        if changed := arguments.changes(state_dict.get("arguments") or {}, self._arguments):
            rank_zero_warn(
                "SMDCallback: resumed with other arguments than the checkpointed run: " + ", ".join(changed) + ". "
                "Restored all the same: the tracked tensors, the running L, the equilibrium stages and the rescale "
                "history (a rescale is neither repeated nor skipped)."
            )
