"""Detection during fit: record the first forward, check radial cosines over a few steps, decide once."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from lightning_smd.core import theory
from lightning_smd.core.messages import rank_zero_warn

from lightning_smd.core.detect import (
    Candidate,
    DataflowRecorder,
    confirm_scale_invariance,
    decide,
    notes_from_recorder,
    precision_floor,
    select,
)
from lightning_smd.core.detect.progress import DetectionProgress
from lightning_smd.core.state import SMDState
from lightning_smd.core.distributed import is_sharded, make_reduce_fn
from lightning_smd.core.loop import LoopView
from lightning_smd.core.plan.simulate import group_label
from lightning_smd.core.steps import radial_floor
from lightning_smd.report.summary import DetectionRow, first_names, format_detection_report
from lightning_smd.core.tracking import Tracked

__all__ = ["Decision", "DetectionSession", "check_filters", "detection_report"]


@dataclass
class Decision:
    """The outcome of detection: the chosen tensors (name → why) and the rejected structural ones."""

    chosen: dict[str, Candidate]
    rejected: dict[str, str] = field(default_factory=dict)
    dead: dict[str, str] = field(default_factory=dict)  # no gradient ever reaches them (name → why)
    eps_dominated: dict[str, str] = field(default_factory=dict)  # normalizations whose input variance ~ eps
    filtered_out: list[str] = field(default_factory=list)  # scale-invariant, but left out by include/exclude


class DetectionSession:
    """Decides, once per fit, which of the trained tensors are scale-invariant.

    The structural evidence comes from the dataflow of the first training forward (no extra
    forward pass); the numerical evidence from the radial cosines of the gradients of the
    following ``detect_steps`` updates of each optimizer. :meth:`step` returns the
    :class:`Decision` on the step it is made (rank 0 decides, every rank gets it), ``None`` before.
    """

    def __init__(self, state: SMDState, detect: str, detect_steps: int, radial_threshold: float, include: Any,
                 exclude: Any, owner: str = "SMDCallback") -> None:
        self.owner = owner  # the user's entry point, named in warnings
        self.state = state  # its progress (state.detection) is checkpointed: a resume continues it
        self.detect = detect
        self.detect_steps = detect_steps
        self.radial_threshold = radial_threshold
        self.include = include
        self.exclude = exclude
        self.tracked: list[Tracked] = []
        self._recorder: DataflowRecorder | None = None
        self._inputs: tuple[Any, tuple, dict] | None = None  # (module, args, kwargs) of the recorded forward
        self._child_inputs: dict[str, tuple[Any, tuple, dict]] = {}  # the same for each direct submodule called
        self._input_hook: Any = None
        self._inputs_recorded = False  # the inputs of one forward were recorded in this fit
        self.done = False

    @property
    def progress(self) -> DetectionProgress:
        return self.state.detection

    def reset(self, tracked: list[Tracked]) -> None:
        """A new fit: forget all evidence, unless a checkpoint taken during detection on these same
        tensors was just loaded (or the same fit goes on): then continue from its evidence."""
        self.discard_recording()
        self.tracked = tracked
        self._inputs, self._child_inputs, self._inputs_recorded = None, {}, False
        if not self._take_restored():
            self.progress.clear()
            self.progress.names = sorted(t.name for t in tracked)
            if self.detect == "numerical":
                self.progress.structural = {}
        self.done = not tracked

    def _take_restored(self) -> bool:
        """Continue a restored progress if it is about the tensors now under detection (else drop it)."""
        progress = self.progress
        if not progress.restored:
            return False
        if progress.names == sorted(t.name for t in self.tracked):
            progress.restored = False
            self._inputs, self._child_inputs, self._inputs_recorded = None, {}, False  # recorded again
            return True
        if self.state.pending is not None:  # about tensors added later: taken up once tracking is restored
            return True
        progress.restored = False
        rank_zero_warn(f"{self.owner}: the checkpoint was taken while detection was deciding on other tensors than "
                       "the optimizers now train; detection starts again.")
        progress.clear()
        progress.names = sorted(t.name for t in self.tracked)
        if self.detect == "numerical":
            progress.structural = {}
        return True

    def start_recording(self, pl_module: torch.nn.Module) -> None:
        """Record the dataflow of the forward about to run (the first training batch only), and
        the inputs of that forward for the finite-difference check (again after a resume)."""
        self._take_restored()  # a checkpoint loaded after fit start (strategies that restore after setup)
        if self.done:
            return
        progress = self.progress
        if progress.structural is None and self._recorder is None:
            self._recorder = DataflowRecorder(pl_module)
            self._recorder.start()
            keep_inputs = True
        else:  # evidence from a checkpoint: its forward's inputs were not kept, this forward's are
            keep_inputs = progress.recorded and not self._inputs_recorded
        if keep_inputs and self._input_hook is None:
            self._inputs_recorded = True  # one forward's, as in a run without interruption
            # the inputs of the module's own forward, to re-run it for the finite-difference check
            self._inputs, self._child_inputs = None, {}
            self._input_hook = [pl_module.register_forward_pre_hook(self._keep_inputs, with_kwargs=True)]
            # a training_step that calls its submodules (self.net(x)) instead of self(x): their inputs
            for prefix, child in pl_module.named_children():
                hook = functools.partial(self._keep_child_inputs, prefix)
                self._input_hook.append(child.register_forward_pre_hook(hook, with_kwargs=True))

    def _keep_inputs(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self._inputs is None:
            self._inputs = (module, args, kwargs)

    def _keep_child_inputs(self, prefix: str, module: Any, args: tuple, kwargs: dict) -> None:
        self._child_inputs.setdefault(prefix, (module, args, kwargs))

    def _remove_input_hooks(self) -> None:
        if self._input_hook is not None:
            for hook in self._input_hook:
                hook.remove()
            self._input_hook = None

    def stop_recording(self) -> None:
        self._remove_input_hooks()
        if self._recorder is not None:
            recorder, self._recorder = self._recorder, None
            self.progress.structural = recorder.stop()
            self.progress.notes = notes_from_recorder(recorder)
            self.progress.recorded = True

    def discard_recording(self) -> None:
        """Stop a recording without keeping what it saw (a checkpoint is about to be loaded, or a new fit)."""
        self._remove_input_hooks()
        if self._recorder is not None:
            recorder, self._recorder = self._recorder, None
            recorder.stop()

    def step(self, view: LoopView, optimizer: torch.optim.Optimizer) -> Decision | None:
        """Advance by one step of ``optimizer`` (gradients final, weights not yet updated).

        Radial cosines are checked per optimizer, on that optimizer's own tensors and steps (with
        several optimizers, e.g. a GAN's, the others' gradients are stale or absent).
        """
        self.stop_recording()
        progress = self.progress
        if self.done or progress.structural is None:
            return None
        if self.detect == "structural":
            return self._decide(view, {})
        index = next(i for i, o in enumerate(view.optimizers) if o is optimizer)
        calls = progress.steps[index] = progress.steps.get(index, 0) + 1
        if calls == 1:  # radial cosines are only trustworthy after this optimizer's first update
            return None
        params = [(t.name, t.param) for t in self.tracked if t.optimizer_index == index]
        reduce = make_reduce_fn([p for _, p in params], flat_shards=view.flat_shards, process_group=view.process_group)
        progress.radial_check(index, params, reduce).update()
        counts = [progress.radial_steps(k) for k in {t.optimizer_index for t in self.tracked}]
        # all optimizers checked, or one of them for long (another one may step rarely, or never)
        if min(counts) >= self.detect_steps or max(counts) >= 4 * self.detect_steps:
            return self._decide(view, progress.cosines())
        return None

    def _decide(self, view: LoopView, cosines: dict[str, float]) -> Decision:
        tracked_names = {t.name for t in self.tracked}
        structural = {n: c for n, c in (self.progress.structural or {}).items() if n in tracked_names}
        norm_affine = [t.name for t in self.tracked if t.norm_affine]
        notes = self.progress.notes
        # 16-bit gradients or parameters: structure is confirmed at the precision's floor, discoveries stay strict
        floor = max((precision_floor(t.param.dtype) for t in self.tracked), default=0.0)
        confirm = max(self.radial_threshold, radial_floor(view.precision), floor)
        chosen, rejected = decide(structural, cosines, self.detect, self.radial_threshold, norm_affine, confirm,
                                  numels={t.name: t.param.numel() for t in self.tracked},
                                  dtypes={t.name: t.param.dtype for t in self.tracked},
                                  confirm=self._finite_difference_check(view),
                                  eps_dominated=notes.eps_dominated if notes else None,
                                  eps_defect=notes.eps_defect if notes else None)
        keep = set(select(list(chosen), include=self.include, exclude=self.exclude))
        filtered_out = sorted(n for n in chosen if n not in keep)
        chosen = {n: c for n, c in chosen.items() if n in keep}
        # Every rank must track the same tensors: rank 0 decides.
        chosen = view.broadcast(chosen, 0)
        self.done, self._inputs, self._child_inputs = True, None, {}
        self.progress.clear()  # decided: the state keeps the chosen tensors from now on
        return Decision(chosen, rejected, dict(notes.dead) if notes else {}, dict(notes.eps_dominated) if notes else {},
                        filtered_out)

    def _finite_difference_check(self, view: LoopView) -> Any:
        """``w → 2w`` on the recorded forward's inputs for numerical discoveries (every rank runs
        it: SyncBN forwards are collectives), or ``None`` where it cannot run: no forward of the
        module itself was recorded (a ``training_step`` that never calls ``self(...)``) or the
        tensors are sharded (a forward of one rank's shards is no forward of the model)."""
        if (self._inputs is None and not self._child_inputs) or is_sharded([t.param for t in self.tracked], view.flat_shards):
            return None
        # the module's own forward; else (training_step calls self.net(x)) the submodule each tensor is in
        runs = {"": self._inputs} if self._inputs is not None else dict(self._child_inputs)

        def confirm(names: list[str]) -> dict[str, str | None]:
            verdicts: dict[str, str | None] = {}
            for prefix, (module, args, kwargs) in runs.items():
                lead = f"{prefix}." if prefix else ""
                mine = [n for n in names if n.startswith(lead)]
                if not mine:
                    continue
                try:
                    found = confirm_scale_invariance(module, [n[len(lead):] for n in mine],
                                                     lambda m=module, a=args, k=kwargs: m(*a, **k))
                    verdicts.update({lead + n: why for n, why in found.items()})
                except Exception as err:  # keep precision: an unconfirmed discovery is left out
                    rank_zero_warn(f"{self.owner}: the finite-difference check of numerical discoveries failed "
                                   f"({type(err).__name__}: {err}); {mine[:3]} are left out.")
                    verdicts.update({n: f"could not be confirmed ({type(err).__name__})" for n in mine})
            for n in names:
                verdicts.setdefault(n, "could not be confirmed: no forward of the module holding it was recorded")
            return verdicts

        return confirm

    def restore(self, names: list[str]) -> tuple[Decision, list[str]]:
        """After a resume: exactly the tensors the checkpointed run tracked (and those now missing).
        A restored progress (tensors added later were being decided on) is left for :meth:`reset`."""
        self.discard_recording()
        if not self.progress.restored:
            self.progress.clear()
        self.done = True
        wanted, known = set(names), {t.name for t in self.tracked}
        chosen = {n: Candidate(n, "restored from checkpoint", "checkpoint") for n in sorted(wanted & known)}
        return Decision(chosen), sorted(wanted - known)


def check_filters(names: list[str], include: Any, exclude: Any, owner: str = "SMDCallback") -> None:
    """Run the ``include``/``exclude`` filters over every name now (before the first step), so a
    callable that raises is reported with the parameter it failed on."""
    for name in names:
        for argument, pattern in (("include", include), ("exclude", exclude)):
            if not callable(pattern):
                continue
            try:
                select([name], **{argument: pattern})
            except Exception as err:
                raise ValueError(
                    f"{owner}({argument}=...) failed on parameter {name!r}: {type(err).__name__}: {err}. "
                    "It is called with every trainable parameter's name and must return True or False."
                ) from err


def detection_report(optimizers: Sequence[torch.optim.Optimizer], tracked: list[Tracked], decision: Decision,
                     units: Any = None, full: bool = True, full_table_at: str | None = None,
                     owner: str = "SMDCallback") -> str:
    """The report printed once detection is decided (rank 0): per tensor (``full``) or grouped
    (see :func:`~lightning_smd.report.summary.format_detection_report`)."""
    if not decision.chosen:
        return nothing_to_measure(len(tracked), decision, owner)
    rows = []
    for t in tracked:
        if t.name not in decision.chosen:
            continue
        optimizer = optimizers[t.optimizer_index]
        rows.append(
            DetectionRow(
                name=t.name,
                shape=tuple(t.param.shape),
                reason=decision.chosen[t.name].reason,
                kind=decision.chosen[t.name].kind,
                group=group_label(optimizers, t.optimizer_index, t.group_index),
                theory=theory.from_param_group(optimizer, optimizer.param_groups[t.group_index]),
            )
        )
    decayed_other = sum(
        1
        for t in tracked
        if t.name not in decision.chosen
        and float(optimizers[t.optimizer_index].param_groups[t.group_index].get("weight_decay", 0.0)) > 0
    )
    names = {t.name for t in tracked}
    return format_detection_report(rows, rejected=decision.rejected, decayed_not_invariant=decayed_other,
                                   total=len(tracked), dead={n: w for n, w in decision.dead.items() if n in names},
                                   eps_dominated=decision.eps_dominated, units=units, full=full,
                                   full_table_at=full_table_at)


def nothing_to_measure(trainable: int, decision: Decision, owner: str = "SMDCallback") -> str:
    """Said once, and nothing else, when no tensor is tracked: there is nothing to measure, and why."""
    if decision.filtered_out:
        why = (f"all {len(decision.filtered_out)} scale-invariant tensors ({first_names(decision.filtered_out)}) "
               f"are left out by {owner}(include=..., exclude=...)")
    else:
        why = (f"none of the {trainable} trainable tensors is scale-invariant: no conv/linear weight feeds only a "
               "normalization (BatchNorm, GroupNorm, LayerNorm, ...), and no weight normalizes itself")
        if decision.rejected:
            why += (f"; structural candidates left out (eps-dominated, or refuted by their radial cosine): "
                    f"{first_names(sorted(decision.rejected))}")
    return (f"SMD: nothing to measure: {why}. The SMD theory (Δ*, ‖w*‖, rescales) applies to scale-invariant "
            "weights only; nothing is measured or rescaled in this fit.")
