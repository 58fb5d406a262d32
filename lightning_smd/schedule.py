"""The schedule watcher: sees each param group's (η, λ) change, starts LR stages, applies the rescale policy."""

from __future__ import annotations

from typing import Any, Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_smd import theory
from lightning_smd.equilibrium import EquilibriumTracker
from lightning_smd.rescale import RescalePolicy, rescale_, rescale_averaged_models
from lightning_smd.tracking import TrackedSet, group_label

__all__ = ["ScheduleWatcher"]

Publish = Callable[[pl.Trainer, dict[str, float], int], None]
HParams = tuple[float, float]


def log_step_of(trainer: pl.Trainer) -> int:
    """Lightning's logging step: optimizer steps taken so far (the axis ``self.log`` uses)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


class ScheduleWatcher:
    """Compares every param group's (lr, weight_decay) with the last seen, before each step.

    On a change it starts a new equilibrium stage for the group and, when ``policy`` asks for a
    rescale, multiplies the group's scale-invariant tensors (and their optimizer state, and the
    EMA/SWA copies) by the factor, exactly once. A change seen before detection has decided which
    tensors are scale-invariant is *deferred* and applied as soon as it has (never skipped).
    Its state (last (η, λ), peak η, deferred rescales, rescale events) is checkpointed.
    """

    def __init__(self, policy: RescalePolicy | None, equilibrium: EquilibriumTracker, publish: Publish,
                 detect_steps: int) -> None:
        self.policy = policy
        self.equilibrium = equilibrium
        self.publish = publish
        self.detect_steps = detect_steps
        self.rescale_events: list[dict[str, Any]] = []
        self.last_hparams: dict[str, HParams] = {}
        self.peak_lr: dict[str, float] = {}
        self.deferred: dict[str, dict[str, Any]] = {}
        self.reference: dict[str, HParams] = {}  # per group: the last (η, λ) with η·λ > 0

    def check(self, trainer: pl.Trainer, tracked: TrackedSet | None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Look at every group (of ``optimizer`` only, when given: inside its step, gradients exist).

        ``tracked`` is ``None`` while detection has not decided yet.
        """
        log_step = log_step_of(trainer)
        factors: dict[str, float] = {}
        for oi, opt in enumerate(trainer.optimizers):
            if optimizer is not None and opt is not optimizer:
                continue
            for gi, group in enumerate(opt.param_groups):
                key = group_label(trainer, oi, gi)
                current = (float(group["lr"]), float(group.get("weight_decay", 0.0)))
                last = self.last_hparams.get(key)
                self.last_hparams[key] = current
                self.peak_lr[key] = max(self.peak_lr.get(key, 0.0), current[0])
                reference = self.reference.get(key)
                if current[0] * current[1] > 0:
                    self.reference[key] = current
                if last is None or last == current:
                    continue
                if current[0] * current[1] <= 0:
                    # η·λ = 0 has no equilibrium: decide when it is non-zero again, against `reference`
                    if reference is not None and last[0] * last[1] > 0:
                        rank_zero_warn(
                            f"SMDCallback: group {key}: lr·weight_decay is 0 from step {log_step} (lr {current[0]:g}, "
                            f"weight decay {current[1]:g}): there is no equilibrium while it is. A rescale is decided "
                            f"when it is non-zero again, against the last non-zero lr {reference[0]:g} and weight decay "
                            f"{reference[1]:g}."
                        )
                    factor = None
                elif reference is None:
                    factor = None  # the first non-zero (η, λ) of the run (e.g. a warmup from 0): nothing to compare
                else:
                    last = reference  # through zero: compare with the last non-zero (η, λ)
                    factor = self.policy.factor(last, current, self.peak_lr[key]) if self.policy else None
                if factor is not None and tracked is None:
                    self._defer(key, oi, gi, factor, last, current, log_step)
                elif factor is not None and self._rescale_group(trainer, tracked, oi, gi, factor, log_step, last, current,
                                                                scale_grads=optimizer is not None):
                    factors[key] = factor
                else:
                    factor = None  # no rescale, or the group holds no scale-invariant tensor
                self._start_stage(trainer, tracked, opt, gi, key, last, current, log_step, rescaled=factor is not None)
        self._log_rescales(trainer, factors, log_step)

    def apply_deferred(self, trainer: pl.Trainer, tracked: TrackedSet, scale_grads: bool) -> None:
        """Apply the rescales deferred until detection decided (``scale_grads``: gradients exist now)."""
        log_step = log_step_of(trainer)
        factors = {}
        for key, d in sorted(self.deferred.items()):
            oi, gi = d["group"]
            first, current = tuple(d["lr"][0]), tuple(d["lr"][1])
            if self._rescale_group(trainer, tracked, oi, gi, d["factor"], log_step, first, current, scale_grads=scale_grads):
                factors[key] = d["factor"]
        self.deferred = {}
        self._log_rescales(trainer, factors, log_step)

    def pending(self, trainer: pl.Trainer, tracked: TrackedSet | None) -> list[str]:
        """The rescales owed but not applied (deferred, or an (η, λ) change after the last step seen)."""
        owed = [f"group {key} (factor {d['factor']:.4f}, lr {d['lr'][0][0]:g} → {d['lr'][1][0]:g}): detection had "
                "not decided which tensors to rescale" for key, d in sorted(self.deferred.items())]
        if self.policy is None:
            return owed
        for oi, opt in enumerate(trainer.optimizers):
            for gi, group in enumerate(opt.param_groups):
                key = group_label(trainer, oi, gi)
                current = (float(group["lr"]), float(group.get("weight_decay", 0.0)))
                last, reference = self.last_hparams.get(key), self.reference.get(key)
                if last is None or last == current or reference is None or key in self.deferred:
                    continue
                if tracked is not None and not tracked.members(oi, gi):
                    continue
                factor = self.policy.factor(reference, current, max(self.peak_lr.get(key, 0.0), current[0]))
                if factor is not None:
                    owed.append(f"group {key} (factor {factor:.4f}, lr {reference[0]:g} → {current[0]:g}): the lr changed "
                                "after the last step; a run resumed from a checkpoint taken now applies it at its first step")
        return owed

    def _defer(self, key: str, oi: int, gi: int, factor: float, last: HParams, current: HParams, log_step: int) -> None:
        """An LR change before detection finished: accumulate its factor, apply it once detection is done."""
        deferred = self.deferred.get(key)
        first = deferred["lr"][0] if deferred else last
        self.deferred[key] = {"group": [oi, gi], "factor": factor * (deferred["factor"] if deferred else 1.0),
                              "lr": [list(first), list(current)]}
        if not deferred:
            rank_zero_warn(
                f"SMDCallback(rescale=...): group {key} changed lr {last[0]:g} → {current[0]:g} at step {log_step}, "
                f"before detection of the scale-invariant tensors finished (detect_steps={self.detect_steps}); "
                "the rescale is applied as soon as detection finishes."
            )

    def _log_rescales(self, trainer: pl.Trainer, factors: dict[str, float], log_step: int) -> None:
        if factors and trainer.is_global_zero:
            metrics = {"smd/rescale_factor": min(factors.values())}
            if len(factors) > 1:
                metrics.update({f"smd/rescale_factor/{k}": f for k, f in factors.items()})
            self.publish(trainer, metrics, log_step)

    def _rescale_group(self, trainer: pl.Trainer, tracked: TrackedSet, oi: int, gi: int, factor: float, log_step: int,
                       last: HParams, current: HParams, scale_grads: bool) -> bool:
        """Rescale the group's scale-invariant tensors; ``False`` when it has none."""
        members = tracked.members(oi, gi)
        if not members:
            return False
        opt = trainer.optimizers[oi]
        untouched = rescale_([t.param for t in members], factor, opt, scale_grads=scale_grads)
        if untouched:
            rank_zero_warn(f"SMDCallback: optimizer state {sorted(untouched)} was left unscaled at the rescale.")
        averaged = rescale_averaged_models(trainer.callbacks, [t.name for t in members], factor)
        label = group_label(trainer, oi, gi)
        self.rescale_events.append({"step": log_step, "group": label, "factor": factor,
                                    "lr": [last[0], current[0]], "weight_decay": [last[1], current[1]],
                                    "tensors": len(members), "averaged_models": averaged})
        rank_zero_info(
            f"SMD: step {log_step}: group {label} lr {last[0]:g} → {current[0]:g}, "
            f"weight decay {last[1]:g} → {current[1]:g}: {len(members)} scale-invariant tensors multiplied by {factor:.4f}"
        )
        return True

    def _start_stage(self, trainer: pl.Trainer, tracked: TrackedSet | None, opt: torch.optim.Optimizer, gi: int,
                     key: str, last: HParams, current: HParams, log_step: int, rescaled: bool) -> None:
        new = theory.from_param_group(opt, opt.param_groups[gi])
        predicted = None
        if new.family in ("sgd", "sgdm") and min(last) > 0 and min(current) > 0:
            predicted = theory.steps_to_equilibrium(last[0] * (1 - new.dampening), new.effective_lr, last[1],
                                                    new.weight_decay, new.momentum)
        names = tracked.names_of(key) if tracked is not None else []
        self.equilibrium.start_stage(key, log_step, predicted, rescaled, names)
        if predicted is not None and trainer.is_global_zero:
            self.publish(trainer, {f"smd/steps_to_equilibrium/predicted/{key}": float(predicted)}, log_step)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_hparams": {k: list(v) for k, v in self.last_hparams.items()},
            "peak_lr": dict(self.peak_lr),
            "rescale_events": list(self.rescale_events),
            "deferred_rescales": dict(self.deferred),
            "reference_hparams": {k: list(v) for k, v in self.reference.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_hparams = {k: (float(v[0]), float(v[1])) for k, v in state["last_hparams"].items()}
        self.peak_lr = dict(state["peak_lr"])
        self.rescale_events = list(state["rescale_events"])
        self.deferred = dict(state.get("deferred_rescales", {}))
        # checkpoints from before 0.2 have no reference: the last non-zero (η, λ) seen is the best guess
        self.reference = {k: (float(v[0]), float(v[1])) for k, v in
                          state.get("reference_hparams", {k: v for k, v in state["last_hparams"].items()
                                                          if v[0] * v[1] > 0}).items()}
