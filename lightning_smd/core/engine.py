"""The engine: the parts of one run, driven by an adapter through a few operations.

``SMDCallback`` (Lightning hooks) and ``SMDMonitor`` (any loop) are thin adapters: at each of
their hooks they build a :class:`~lightning_smd.core.loop.LoopView` of their loop and call the
operation here. The engine owns the parts (the checkpointed :class:`~lightning_smd.core.state.SMDState`,
the detection session, the tracked set and its step recorder, the schedule watcher, the metrics
builder) and torch's step hooks on the optimizers. Results leave through ``publish(metrics, step)``,
given by the adapter (Lightning's loggers, or the monitor's ``pop_metrics``). Warnings and errors
name the adapter's entry point (``owner``). The data flow of one step is in ``docs/architecture.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from lightning_smd.core.channels import ChannelMetrics
from lightning_smd.core.detect import Candidate
from lightning_smd.core.detection_session import Decision, DetectionSession, check_filters, detection_report
from lightning_smd.core.equilibrium import EquilibriumTracker
from lightning_smd.core.estimates import RunningMean
from lightning_smd.core.loop import LoopView
from lightning_smd.core.messages import rank_zero_info, rank_zero_warn
from lightning_smd.core.metrics import MetricsBuilder
from lightning_smd.core.plan import Plan, plan_fit
from lightning_smd.core.rescale import RescalePolicy
from lightning_smd.core.result import Labeller
from lightning_smd.core.schedule import ScheduleWatcher
from lightning_smd.core.state import SMDState
from lightning_smd.core.steps import StepHooks, StepRecorder, found_inf_of
from lightning_smd.core.tracking import Tracked, TrackedSet, param_counts, trainable
from lightning_smd.core.units import Unit, invariance_units

__all__ = ["SMDEngine"]

Publish = Callable[[dict[str, float], int], None]


def _discard(metrics: dict[str, float], step: int) -> None:
    """No adapter output given: results are dropped."""


class SMDEngine:
    """Detection, measurement, the running estimates, equilibrium and rescales of one run (torch only).

    Args:
        owner: the user's entry point (``"SMDCallback"``, ``"SMDMonitor"``), named in warnings.
        state: everything a checkpoint keeps.
        policy: the rescale policy, or ``None`` (monitor only).
        publish: where metric dicts go, ``publish(metrics, log_step)`` (rank 0); settable later.
        The other arguments are the adapters' options of the same names.
    """

    def __init__(self, owner: str, state: SMDState, *, policy: RescalePolicy | None, rescale: Any,
                 rescale_min_drop: float, log_every_n_steps: int | None, include: Any, exclude: Any, detect: str,
                 detect_steps: int, radial_threshold: float, unit_grad_every: int, warm_start: bool | int,
                 per_channel: bool, channel_every: int, verbose: bool | int,
                 publish: Publish | None = None) -> None:
        self.owner = owner
        self.state = state
        self.policy = policy
        self.rescale = rescale
        self.rescale_min_drop = rescale_min_drop
        self.log_every_n_steps = log_every_n_steps
        self.include, self.exclude, self.detect = include, exclude, detect
        self.detect_steps = detect_steps
        self.radial_threshold = radial_threshold
        self.unit_grad_every = unit_grad_every
        self.warm_start = warm_start
        self.per_channel = per_channel
        self.channel_every = channel_every
        self.verbose = verbose
        self.publish: Publish = publish or _discard
        self._hooks: StepHooks | None = None
        self._view_fn: Callable[[], LoopView] | None = None  # the adapter's view, built inside torch's step hooks
        self.start_fresh()

    @classmethod
    def from_options(cls, owner: str, options: dict[str, Any], record: dict[str, Any], policy: RescalePolicy | None,
                     publish: Publish | None = None) -> SMDEngine:
        """The engine of an adapter's validated options (its constructor's arguments by name:
        the flat ones and the ``detection``/``estimates``/``equilibrium`` groups); ``record``: what a
        checkpoint keeps of them; ``policy``: the rescale policy they select (``None``: no rescale)."""
        detection, estimates, equilibrium = options["detection"], options["estimates"], options["equilibrium"]
        per_channel, rescale = options["per_channel"], options["rescale"]
        return cls(
            owner,
            # everything a checkpoint keeps (see docs/architecture.md)
            SMDState(estimates.ema_steps, equilibrium.tolerance, equilibrium.window, per_channel is not False,
                     options["warmup_steps"], record),
            policy=policy, rescale=rescale.mode if isinstance(rescale, RescalePolicy) else rescale,
            rescale_min_drop=policy.min_drop if policy is not None else RescalePolicy.min_drop,
            log_every_n_steps=options["log_every_n_steps"], include=options["include"], exclude=options["exclude"],
            detect=detection.mode, detect_steps=detection.steps, radial_threshold=detection.radial_threshold,
            unit_grad_every=estimates.unit_grad_every, warm_start=options["warm_start"],
            per_channel=per_channel is not False,
            # per_channel=True: the units on every measured step; N: on the one ending each block of N
            channel_every=1 if isinstance(per_channel, bool) else per_channel, verbose=options["verbose"],
            publish=publish,
        )

    def start_fresh(self) -> None:
        """A new run: the state reset, and the parts that read it made anew."""
        self.state.reset()
        self.detection = DetectionSession(self.state, self.detect, self.detect_steps, self.radial_threshold,
                                          self.include, self.exclude, owner=self.owner)
        self.schedule = ScheduleWatcher(self.policy, self.state, self._publish, self.detect_steps,
                                        warm_start=self.warm_start, owner=self.owner)
        self.metrics = MetricsBuilder(self.state, owner=self.owner)
        self._labeller = Labeller()  # the column labels, built once per set of slices
        self.detection_text: str | None = None  # the detection report, once decided
        self.skipped_steps = 0  # measured steps the GradScaler skipped (not logged)
        self.trainable: list[Tracked] = []
        self.tracked: TrackedSet | None = None  # None until detection decided
        self.plan: Plan | None = None  # the LR stages of the fit, predicted at train start (rank 0)
        self._param_counts: tuple[int, ...] = ()  # tensors per param group when detection last decided
        self._added_at = 0
        # optimizer id → log step: a measured step announced (before_optimizer_step) that torch has
        # not run yet; left at the batch end, the GradScaler skipped it
        self._due: dict[int, int] = {}

    def _publish(self, metrics: dict[str, float], step: int) -> None:
        self.publish(metrics, step)  # the adapter's, looked up at each call (picklable: ddp_spawn pickles it)

    # ------------------------------------------------------------ read-only views
    @property
    def candidates(self) -> dict[str, Candidate]:
        return self.state.candidates

    @property
    def units(self) -> dict[str, Unit]:
        return self.state.units

    @property
    def unit_grad(self) -> RunningMean:
        return self.state.unit_grad

    @property
    def equilibrium(self) -> EquilibriumTracker:
        return self.state.equilibrium

    @property
    def channels(self) -> ChannelMetrics | None:
        return self.state.channels

    @property
    def rescale_events(self) -> list[dict[str, Any]]:
        return self.schedule.rescale_events

    @property
    def measurer(self) -> StepRecorder | None:
        return self.tracked.recorder if self.tracked is not None else None

    def every(self, view: LoopView) -> int:
        """Measure every this many optimizer steps: the option, else the loop's cadence."""
        return self.log_every_n_steps or view.log_every_n_steps

    # ------------------------------------------------------------------ operations
    def fit_start(self, view: LoopView, view_fn: Callable[[], LoopView], continuing: bool = False) -> None:
        """Hook torch's step hooks onto the optimizers; list the trainable tensors; (re)start detection.

        ``view_fn`` builds the adapter's view inside the step hooks; ``continuing``: the same run goes on
        (or a checkpoint was loaded into it)."""
        self.remove_hooks()
        self._view_fn = view_fn
        # measured at the step that really happens: after clipping and unscaling, once per step() call
        self._hooks = StepHooks(list(view.optimizers), self._before_step, self._after_step)
        self._due = {}
        self.trainable = trainable(view.optimizers, view.model, self.owner)
        check_filters([t.name for t in self.trainable], self.include, self.exclude, self.owner)
        self.tracked = None
        if continuing and not self.candidates and self.state.pending is None:
            self.state.detection.restored = True  # detection was under way: go on with its evidence
        self.detection.reset(self.trainable)
        if continuing and self.candidates and self.state.pending is None:
            self.state.pending = sorted(self.candidates)  # continue tracking them (the resume path)
        if not self.trainable:
            rank_zero_warn(f"{self.owner}: the optimizers hold no parameters; nothing to measure.")
            self.tracked = TrackedSet(view, [], self.unit_grad_every, owner=self.owner)

    def train_start(self, view: LoopView) -> Plan | None:
        """Fix the warm start's step; on rank 0, plan the fit's LR stages (with ``view.horizon``)."""
        warm_at = self.schedule.resolve_warm_start(self.every(view), self.unit_grad_every)
        if warm_at is not None and self.verbose and not self.schedule.warm_start_done:
            rank_zero_info(f"SMD: warm start at step {warm_at}: every tracked tensor is then set to its predicted "
                           "equilibrium norm ‖w*‖ from the running L (once).")
        # the schedule through the whole fit, known now (epoch length included); no collective
        if not view.is_global_zero or view.horizon is None:
            return None
        self.plan = None  # a failed prediction leaves no earlier fit's plan behind
        try:
            self.plan = plan_fit(view.optimizers, view.horizon, view.global_step, rescale=self.rescale,
                                 min_drop=self.rescale_min_drop, warmup_steps=self.schedule.warmup.warmup_steps)
        except Exception as err:  # a prediction must never stop a training run
            rank_zero_warn(f"{self.owner}: could not plan the LR schedule ({type(err).__name__}: {err}); "
                           "training and measurement go on without a plan.")
        return self.plan

    def batch_start(self, view: LoopView) -> None:
        """Before an iteration's forward: restore tracking after a resume, record the first forward,
        notice tensors added to the optimizers, the warm start when due."""
        if self.tracked is None and self.state.pending is not None:
            # param groups other callbacks restored in their on_fit_start (e.g. BackboneFinetuning) count too
            self.trainable = trainable(view.optimizers, view.model, self.owner)
            decision, missing = self.detection.restore(self.state.pending)
            if missing:
                rank_zero_warn(f"{self.owner}: {len(missing)} tensors tracked before the resume are gone: {missing[:5]}")
            self.state.pending = None
            self._start_tracking(view, decision, scale_grads=False)  # at batch start: no gradients yet
            if self.state.detection.restored:  # tensors added later were being decided on: go on
                under_way = set(self.state.detection.names)
                self._added_at = view.log_step
                self.detection.reset([t for t in self.trainable if t.name in under_way])
                self.detection.start_recording(view.model)
        else:
            if self.tracked is not None and param_counts(view.optimizers) != self._param_counts:
                self._detect_added_tensors(view)
            self.detection.start_recording(view.model)
        self.schedule.warm_start_if_due(view, self.tracked)

    def before_backward(self) -> None:
        """The first forward is over: its dataflow is detection's structural evidence."""
        self.detection.stop_recording()

    def before_optimizer_step(self, view: LoopView, optimizer: torch.optim.Optimizer) -> Decision | None:
        """Gradients exist (an adapter's hook before the step): detection's step; announce a measured step.

        Returns the :class:`Decision` on the step detection decides (the adapter reports it)."""
        if self.tracked is None:
            decision = self.detection.step(view, optimizer)
            if decision is not None:
                # detection ends before the step: gradients exist and must follow the weights
                self._start_tracking(view, decision, scale_grads=True)
            return decision
        if not self.detection.done:  # tensors added to the optimizers after fit start
            decision = self.detection.step(view, optimizer)
            if decision is not None:
                self._add_tracking(view, decision)
        log_step = view.log_step
        if self.measurer is None or (log_step + 1) % self.every(view) != 0:
            return None
        if self.tracked.measure_on_all_ranks or view.is_global_zero:
            self._due[id(optimizer)] = log_step  # measured by the step hooks, if the step happens
        return None

    def _before_step(self, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any]) -> None:
        """torch's step pre-hook: the gradients are final (clipped, unscaled) and the step happens."""
        if self._view_fn is None:
            return
        view = self._view_fn()
        # an (η, λ) change since this optimizer's last step (schedulers, ReduceLROnPlateau, the user):
        # a new equilibrium stage, and the rescale, gradients included
        self.schedule.check(view, self.tracked, optimizer)
        log_step = self._due.pop(id(optimizer), None)
        if log_step is not None and self.measurer is not None:
            self.measurer.begin(optimizer, log_step, view.global_step, self.every(view), view.grad_scaler,
                                found_inf_of(optimizer, kwargs))

    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """torch's step post-hook: finish the measurement on the device (a collective where sharded)."""
        if self.measurer is not None:
            self.measurer.finish(optimizer)

    def batch_end(self, view: LoopView) -> list[int]:
        """After an iteration: the measured steps to the host (rank 0, once each), their metrics
        published, the running estimates updated. Returns the log steps of the finished steps (rank 0)."""
        if self.measurer is None:
            return []
        if self._due and view.is_global_zero:
            self.skipped_steps += 1  # announced, never run: the GradScaler skipped it (inf/NaN gradients)
        self._due = {}
        steps = self.measurer.pop_finished()
        if not view.is_global_zero:
            return []
        for finished in steps:
            stats, skipped = finished.to_host()
            if skipped:  # a fused optimizer's step the GradScaler skipped: nothing moved, nothing to log
                self.skipped_steps += 1
                continue
            result = self._labeller.label(stats, finished, self.tracked)  # the labelled step every reader takes
            self.publish(self.metrics.build(result, self.tracked.groups, self.tracked.names), result.log_step)
            self.schedule.observe(result)  # the update RMS of AdamW/Lion/Muon tensors
        return [s.log_step for s in steps]

    def train_end(self, view: LoopView) -> None:
        """Warn about rescales still owed."""
        for owed in self.schedule.pending(view, self.tracked):
            rank_zero_warn(f"{self.owner}: a rescale was still pending when training ended: {owed}.")

    def fit_end(self, view: LoopView) -> None:
        """The equilibrium summary (rank 0, ``verbose``)."""
        self.detection.stop_recording()
        if view.is_global_zero and self.verbose and self.equilibrium.stages and self.candidates:
            rank_zero_info(self.equilibrium.summary())

    def remove_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        self._hooks, self._view_fn = None, None

    def end(self) -> None:
        """Stop any recording and remove torch's step hooks (the run is over, or failed)."""
        self.detection.stop_recording()
        self.remove_hooks()

    # ------------------------------------------------------------------ reports
    def report_detection(self, view: LoopView, decision: Decision, table_path: Path | None) -> None:
        """Rank 0: the full per-tensor table into ``table_path``; on the console the grouped report
        (``verbose=True``) or the full table (``verbose=2``), then the plan."""
        if not view.is_global_zero:  # formatted where it is shown
            return
        self.detection_text = detection_report(view.optimizers, self.trainable, decision, units=self.units,
                                               owner=self.owner)
        where = None
        if table_path is not None:
            try:
                table_path.parent.mkdir(parents=True, exist_ok=True)
                table_path.write_text(self.detection_text + "\n")
                where = f"{self.owner}(verbose=2), and {table_path}"
            except OSError as err:
                rank_zero_warn(f"{self.owner}: could not write {table_path}: {err}")
        if not self.verbose:
            return
        full = self.verbose is not True and int(self.verbose) >= 2
        rank_zero_info(detection_report(view.optimizers, self.trainable, decision, units=self.units, full=full,
                                        full_table_at=where or f"{self.owner}(verbose=2)", owner=self.owner))
        if not decision.chosen:  # nothing to measure: the report said why, once
            return
        if self.plan is not None:
            rank_zero_info(self.plan.format(legend=full))
        if (copied := self.tracked.snapshot_note()):
            rank_zero_info(copied)

    # ------------------------------------------------------------------ tracking
    def _start_tracking(self, view: LoopView, decision: Decision, scale_grads: bool) -> None:
        self.state.candidates = dict(decision.chosen)
        self.tracked = TrackedSet(view, [t for t in self.trainable if t.name in decision.chosen], self.unit_grad_every,
                                  self._unit_counts(view), self.channel_every, owner=self.owner)
        self._param_counts = param_counts(view.optimizers)
        self.schedule.apply_deferred(view, self.tracked, scale_grads=scale_grads)

    def _unit_counts(self, view: LoopView) -> dict[str, int] | None:
        """per_channel: the invariance units of the chosen tensors, from detection's evidence."""
        if not self.per_channel:
            return None
        derived = invariance_units(view.model, self.candidates)
        # after a resume the candidates' evidence is gone ("restored from checkpoint"): the checkpointed units
        self.state.units = {n: self.units.get(n, u) if self.candidates[n].source == "checkpoint" else u
                            for n, u in derived.items()}
        return {n: u.count for n, u in self.units.items()}

    def _detect_added_tensors(self, view: LoopView) -> None:
        """The optimizers hold more tensors than when detection decided (``add_param_group``, e.g.
        ``BackboneFinetuning`` unfreezing a backbone): detect among the new ones, from this batch on."""
        self._param_counts = param_counts(view.optimizers)
        known = {id(t.param) for t in self.trainable}
        self.trainable = trainable(view.optimizers, view.model, self.owner)
        added = [t for t in self.trainable if id(t.param) not in known]
        if added:
            self._added_at = view.log_step
            self.detection.reset(added)

    def _add_tracking(self, view: LoopView, decision: Decision) -> None:
        """Track the scale-invariant ones among the added tensors from now on, next to the others."""
        self.state.candidates = {**self.candidates, **decision.chosen}
        self.tracked = TrackedSet(view, [t for t in self.trainable if t.name in self.candidates], self.unit_grad_every,
                                  self._unit_counts(view), self.channel_every, owner=self.owner)
        step = view.log_step
        for group in sorted({g for n, g in zip(self.tracked.names, self.tracked.groups) if n in decision.chosen}):
            if self.equilibrium.current_stage(group) is None:  # a new param group: its first stage starts now
                self.equilibrium.start_stage(group, step, None, False, self.tracked.names_of(group))
        if self.verbose and view.is_global_zero:  # formatted where it is shown
            added = self.detection.tracked
            rank_zero_info(
                f"SMD: {len(added)} tensors were added to the optimizers (add_param_group) or unfrozen (requires_grad) "
                f"at step {self._added_at}; "
                f"from step {step} on, the scale-invariant ones among them are tracked too.\n"
                + detection_report(view.optimizers, added, decision, owner=self.owner)
            )

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detection.discard_recording()  # a forward recorded before the load is no evidence of this run
        self.state.load_state_dict(state_dict)
        self.tracked = None
