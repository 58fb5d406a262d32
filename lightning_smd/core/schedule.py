"""The schedule watcher: sees each param group's (η, λ) change, starts LR stages, applies the rescale policy.

It also moves weights to their *predicted* equilibrium norm: per tensor at an LR change with
``rescale="equilibrium"``, and once for every tracked tensor with ``warm_start``.

Drop rescale: the factor is the family's k^(-e) (:func:`drop_exponent`): k^(-1/4) for SGD/SGDM/Nesterov,
k^(-1/2) for AdamW/Lion/Muon (``docs/optimizer_theory.md`` §5).

Equilibrium rescale (issue 16). The fixed factor k^(-e) is exact only when ‖w_t‖ = ‖w*‖ before
the change: for SGD Δ_t ≈ η‖g̃_t‖/‖w_t‖², so it keeps the ratio Δ_t/Δ* and a tensor at 0.2 Δ*
before a drop is at 0.2 of the new Δ* after it. Instead, per tensor, ``f = ‖w*'‖/‖w_t‖`` with
‖w*'‖ the equilibrium norm at the *new* (η', λ'):

* SGD / SGDM: ‖w*'‖² = sqrt(L·η'/(2λ')) (SGDM: sqrt(L·η'/(λ'(1 − α)(2 − λ'η'/(1 + α))))), L the
  running estimate of the unit gradient E‖g̃‖² (E h̃ with momentum). L is a property of the
  direction (g̃ = g·‖w‖ does not depend on ‖w‖), so it is valid at any norm. Then
  Δ ≈ η'·sqrt(L)/‖w*'‖² = sqrt(2λ'η') = Δ*' at once (SGD; SGDM likewise with its formulas). At
  equilibrium ‖w_t‖ = (Lη/2λ)^(1/4), so f = ((η'λ)/(ηλ'))^(1/4) = k^(-1/4): the paper's rescale.
* AdamW / Lion / Muon: the update u (m̂/(√v̂+ε), sign(·), NS(momentum)) does not scale with ‖w‖; its measured
  tangential RMS ū = sqrt(E[(Δ_t·‖w_t‖/η_t)²]) (a running mean fed by :meth:`observe`) gives
  ‖w*'‖ = η'·ū/Δ*' (:func:`lightning_smd.theory.equilibrium_norm_from_update`); at equilibrium
  f = k^(-1/2).

Tensors whose estimate is not known yet (too early) get the policy's fixed factor, with a warning.
The estimates live on rank 0; the factors are computed there and broadcast, so every rank
multiplies by the same numbers (``check`` runs on every rank: the collective is safe there).
"""

from __future__ import annotations

from typing import Any, Callable

import math

import numpy as np
import torch
from lightning_smd.core.messages import rank_zero_info, rank_zero_warn

from lightning_smd.core import theory
from lightning_smd.core.distributed import make_reduce_fn
from lightning_smd.core.equilibrium import EquilibriumTracker
from lightning_smd.core.estimates import RunningMean
from lightning_smd.core.loop import LoopView
from lightning_smd.core.measure import local
from lightning_smd.core.plan.warmup import WarmupTracker, is_warmup_change
from lightning_smd.core.state import ScheduleMemory, SMDState
from lightning_smd.core.result import StepResult
from lightning_smd.core.rescale import RescalePolicy, rescale_, rescale_averaged_models
from lightning_smd.report.summary import first_names
from lightning_smd.core.plan.simulate import group_label
from lightning_smd.core.tracking import Tracked, TrackedSet

__all__ = ["FAR_FROM_EQUILIBRIUM", "ScheduleWatcher", "default_warm_start_steps"]

#: a rescale applied while the window mean of Δ_t/Δ* is outside 1 ± this warns
FAR_FROM_EQUILIBRIUM = 0.3
#: ``warm_start=True`` waits for this many samples of L (about 1/sqrt(32) ≈ 18 % noise on a single
#: tensor's L, hence ≈ 4 % on ‖w*‖ ∝ L^(1/4) and ≈ 9 % on Δ ∝ sqrt(L_true/L_est))
WARM_START_L_SAMPLES = 32


def default_warm_start_steps(detect_steps: int, every: int, unit_grad_every: int,
                             samples: int = WARM_START_L_SAMPLES) -> int:
    """Steps before ``warm_start=True`` acts: detection (``detect_steps`` + 1) then ``samples``
    samples of L, which is sampled once per ``max(log_every_n_steps, unit_grad_every)`` steps."""
    return detect_steps + 1 + samples * max(every, unit_grad_every)

Publish = Callable[[dict[str, float], int], None]
HParams = tuple[float, float]


class ScheduleWatcher:
    """Compares every param group's (lr, weight_decay) with the last seen, before each step.

    On a change it starts a new equilibrium stage for the group and, when ``policy`` asks for a
    rescale, multiplies the group's scale-invariant tensors (and their optimizer state, and the
    EMA/SWA copies) by the factor, exactly once. A change seen before detection has decided which
    tensors are scale-invariant is *deferred* and applied as soon as it has (never skipped).
    With ``policy.mode == "equilibrium"`` each tensor gets its own factor ‖w*'‖/‖w_t‖ (module
    docstring); ``warm_start`` (``True`` or a step count) sets every tracked tensor to its predicted
    ‖w*‖ once, at ``warm_start_steps``. Any rescale applied while a tensor's window mean of Δ_t/Δ*
    is outside ±30 % warns, naming the tensors, the ratio and what to do.
    What it remembers (last (η, λ), peak η, deferred rescales, rescale events, whether the warm start
    was done) and the running update RMS ū live in the :class:`~lightning_smd.core.state.SMDState`
    it is given (checkpointed there).
    """

    def __init__(self, policy: RescalePolicy | None, state: SMDState, publish: Publish, detect_steps: int,
                 warm_start: bool | int = False, owner: str = "SMDCallback") -> None:
        self.owner = owner  # the user's entry point, named in warnings
        self.policy = policy
        self.state = state  # what it remembers (state.schedule), the running L and ū², stages, warm-up
        self.publish = publish
        self.detect_steps = detect_steps
        self.warm_start = warm_start
        # an int is the step itself; True is resolved by `resolve_warm_start` once the Trainer is known
        self.warm_start_steps: int | None = warm_start if warm_start and not isinstance(warm_start, bool) else None

    @property
    def memory(self) -> ScheduleMemory:
        return self.state.schedule

    @property
    def equilibrium(self) -> EquilibriumTracker:
        return self.state.equilibrium

    @property
    def unit_grad(self) -> RunningMean:
        return self.state.unit_grad

    @property
    def update_sq(self) -> RunningMean:
        """ū² per tensor (AdamW / Lion / Muon)."""
        return self.state.update_sq

    @property
    def warmup(self) -> WarmupTracker:
        """LR warm-up: one stage with its plateau, never rescaled."""
        return self.state.warmup

    @property
    def rescale_events(self) -> list[dict[str, Any]]:
        return self.memory.rescale_events

    @property
    def warm_start_done(self) -> bool:
        return self.memory.warm_start_done

    def check(self, view: LoopView, tracked: TrackedSet | None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Look at every group (of ``optimizer`` only, when given: inside its step, gradients exist).

        ``tracked`` is ``None`` while detection has not decided yet.
        """
        log_step = view.log_step
        factors: dict[str, float] = {}
        for oi, opt in enumerate(view.optimizers):
            if optimizer is not None and opt is not optimizer:
                continue
            for gi, group in enumerate(opt.param_groups):
                key = group_label(view.optimizers, oi, gi)
                current = (float(group["lr"]), float(group.get("weight_decay", 0.0)))
                last = self.memory.last_hparams.get(key)
                self.memory.last_hparams[key] = current
                self.memory.peak_lr[key] = max(self.memory.peak_lr.get(key, 0.0), current[0])
                reference = self.memory.reference.get(key)
                if current[0] * current[1] > 0:
                    self.memory.reference[key] = current
                if last is None or last == current:
                    continue
                if self.warmup.classify(key, last, current, log_step):  # no stage, no prediction, no rescale
                    self.equilibrium.restart(key, log_step, tracked.names_of(key) if tracked is not None else [])
                    continue
                if current[0] * current[1] <= 0:
                    # η·λ = 0 has no equilibrium: decide when it is non-zero again, against `reference`
                    if reference is not None and last[0] * last[1] > 0:
                        rank_zero_warn(
                            f"{self.owner}: group {key}: lr·weight_decay is 0 from step {log_step} (lr {current[0]:g}, "
                            f"weight decay {current[1]:g}): there is no equilibrium while it is. A rescale is decided "
                            f"when it is non-zero again, against the last non-zero lr {reference[0]:g} and weight decay "
                            f"{reference[1]:g}."
                        )
                    factor = None
                elif reference is None:
                    factor = None  # the first non-zero (η, λ) of the run (e.g. a warmup from 0): nothing to compare
                else:
                    last = reference  # through zero: compare with the last non-zero (η, λ)
                    factor = (self.policy.factor(*_effective(opt, group, last, current), self.memory.peak_lr[key],
                                                 drop_exponent(opt, group)) if self.policy else None)
                if factor is not None and tracked is None:
                    self._defer(key, oi, gi, factor, last, current, log_step)
                    factor = None
                elif factor is not None:
                    # None: the group holds no scale-invariant tensor
                    factor = self._rescale_group(view, tracked, oi, gi, factor, log_step, last, current,
                                                 scale_grads=optimizer is not None)
                if factor is not None:
                    factors[key] = factor
                self._start_stage(view, tracked, opt, gi, key, last, current, log_step, rescaled=factor is not None)
        self._log_rescales(view, factors, log_step)
        if optimizer is None:
            self._maybe_warm_start(view, tracked, log_step)

    def warm_start_if_due(self, view: LoopView, tracked: TrackedSet | None) -> None:
        """The warm start, once, at ``warm_start_steps`` (before the batch: no gradients yet)."""
        self._maybe_warm_start(view, tracked, view.log_step)

    def apply_deferred(self, view: LoopView, tracked: TrackedSet, scale_grads: bool) -> None:
        """Apply the rescales deferred until detection decided (``scale_grads``: gradients exist now)."""
        log_step = view.log_step
        factors = {}
        for key, d in sorted(self.memory.deferred.items()):
            oi, gi = d["group"]
            first, current = tuple(d["lr"][0]), tuple(d["lr"][1])
            applied = self._rescale_group(view, tracked, oi, gi, d["factor"], log_step, first, current,
                                          scale_grads=scale_grads)
            if applied is not None:
                factors[key] = applied
        self.memory.deferred = {}
        self._log_rescales(view, factors, log_step)

    def pending(self, view: LoopView, tracked: TrackedSet | None) -> list[str]:
        """The rescales owed but not applied (deferred, or an (η, λ) change after the last step seen)."""
        owed = [f"group {key} (factor {d['factor']:.4f}, lr {d['lr'][0][0]:g} → {d['lr'][1][0]:g}): detection had "
                "not decided which tensors to rescale" for key, d in sorted(self.memory.deferred.items())]
        if self.policy is None:
            return owed
        for oi, opt in enumerate(view.optimizers):
            for gi, group in enumerate(opt.param_groups):
                key = group_label(view.optimizers, oi, gi)
                current = (float(group["lr"]), float(group.get("weight_decay", 0.0)))
                last, reference = self.memory.last_hparams.get(key), self.memory.reference.get(key)
                if last is None or last == current or reference is None or key in self.memory.deferred:
                    continue
                if is_warmup_change(last, current, view.log_step, key not in self.warmup.ended,
                                    self.warmup.warmup_steps):
                    continue  # a warm-up change: never rescaled
                if tracked is not None and not tracked.members(oi, gi):
                    continue
                factor = self.policy.factor(*_effective(opt, group, reference, current),
                                            max(self.memory.peak_lr.get(key, 0.0), current[0]), drop_exponent(opt, group))
                if factor is not None:
                    owed.append(f"group {key} (factor {factor:.4f}, lr {reference[0]:g} → {current[0]:g}): the lr changed "
                                "after the last step; a run resumed from a checkpoint taken now applies it at its first step")
        return owed

    def _defer(self, key: str, oi: int, gi: int, factor: float, last: HParams, current: HParams, log_step: int) -> None:
        """An LR change before detection finished: accumulate its factor, apply it once detection is done."""
        deferred = self.memory.deferred.get(key)
        first = deferred["lr"][0] if deferred else last
        self.memory.deferred[key] = {"group": [oi, gi], "factor": factor * (deferred["factor"] if deferred else 1.0),
                              "lr": [list(first), list(current)]}
        if not deferred:
            rank_zero_warn(
                f"{self.owner}(rescale=...): group {key} changed lr {last[0]:g} → {current[0]:g} at step {log_step}, "
                f"before detection of the scale-invariant tensors finished (DetectionOptions.steps={self.detect_steps}); "
                "the rescale is applied as soon as detection finishes."
            )

    def _log_rescales(self, view: LoopView, factors: dict[str, float], log_step: int) -> None:
        if factors and view.is_global_zero:
            metrics = {"smd/rescale_factor": min(factors.values())}
            if len(factors) > 1:
                metrics.update({f"smd/rescale_factor/{k}": f for k, f in factors.items()})
            self.publish(metrics, log_step)

    def _rescale_group(self, view: LoopView, tracked: TrackedSet, oi: int, gi: int, factor: float, log_step: int,
                       last: HParams, current: HParams, scale_grads: bool) -> float | None:
        """Rescale the group's scale-invariant tensors; return the factor (the geometric mean of the
        per-tensor factors in "equilibrium" mode), ``None`` when it has none. Every rank calls it."""
        members = tracked.members(oi, gi)
        if not members:
            return None
        opt = view.optimizers[oi]
        label = group_label(view.optimizers, oi, gi)
        per_tensor = self.policy is not None and self.policy.mode == "equilibrium"
        k_text = _k_text(drop_exponent(opt, opt.param_groups[gi]))
        self._warn_if_far(label, members, log_step, factor, per_tensor, k_text)
        if per_tensor:
            factors, missing = self._target_factors(view, members, opt, gi, fallback=factor)
            if missing:
                rank_zero_warn(
                    f"{self.owner}(rescale='equilibrium'): step {log_step}: group {label}: no estimate of the new "
                    f"equilibrium norm yet for {first_names(missing)} (L or the update RMS is measured from "
                    f"the first measured steps after detection on); they are multiplied by the fixed factor "
                    f"{factor:.4f} ({k_text}) instead."
                )
        else:
            factors = [factor] * len(members)
        untouched, averaged = self._apply(view, members, factors, opt, scale_grads)
        if untouched:
            rank_zero_warn(f"{self.owner}: optimizer state {sorted(untouched)} was left unscaled at the rescale.")
        applied = _geometric_mean(factors)
        event = {"step": log_step, "group": label, "factor": applied,
                 "lr": [last[0], current[0]], "weight_decay": [last[1], current[1]],
                 "tensors": len(members), "averaged_models": averaged}
        if per_tensor:
            event.update(kind="equilibrium", factors={t.name: f for t, f in zip(members, factors)})
        self.memory.rescale_events.append(event)
        how = (f"moved to their predicted equilibrium norms (factors {min(factors):.4f} to {max(factors):.4f})"
               if per_tensor else f"multiplied by {factor:.4f}")
        rank_zero_info(
            f"SMD: step {log_step}: group {label} lr {last[0]:g} → {current[0]:g}, "
            f"weight decay {last[1]:g} → {current[1]:g}: {len(members)} scale-invariant tensors {how}"
        )
        return applied

    # ------------------------------------------------------- equilibrium control
    def observe(self, result: StepResult) -> None:
        """Feed the running ū² = (Δ_t·‖w_t‖/η_t)² of AdamW/Lion/Muon tensors (rank 0, per measured step),
        from the labelled step :class:`~lightning_smd.core.result.StepResult`. SGD groups need nothing (they use L)."""
        spans = [(a, b, t.lr) for (a, b), t in zip(result.spans, result.slice_theories) if t.decoupled]
        if not spans:
            return
        names = [name for a, b, _ in spans for name in result.names[a:b]]
        columns = np.concatenate([np.arange(a, b) for a, b, _ in spans])
        lrs = np.concatenate([np.full(b - a, lr) for a, b, lr in spans])
        delta, w_norm = result.delta[columns], result.w_norm[columns]
        with np.errstate(invalid="ignore", over="ignore"):
            samples = (delta * w_norm / lrs) ** 2
        samples[~(np.isfinite(delta) & np.isfinite(w_norm))] = np.nan
        self.update_sq.update_array(names, samples, result.log_step)

    def update_rms(self, name: str) -> float | None:
        """ū of one tensor (AdamW/Lion), or ``None`` before its first measurement."""
        value = self.update_sq.get(name)
        return math.sqrt(value) if value > 0 else None

    def target_norm(self, group_theory: theory.GroupTheory, name: str, shape: Any = None) -> float | None:
        """‖w*‖ of tensor ``name`` (of ``shape``: Muon's Δ* depends on it) at ``group_theory``'s
        hyper-parameters (rank 0), or ``None``."""
        unit_grad = self.unit_grad.get(name)
        return group_theory.equilibrium_norm(unit_grad if math.isfinite(unit_grad) else None, self.update_rms(name),
                                             shape)

    def resolve_warm_start(self, every: int, unit_grad_every: int) -> int | None:
        """Fix ``warm_start=True``'s step from the Trainer's measurement cadence; return the step."""
        if self.warm_start is True and self.warm_start_steps is None:
            self.warm_start_steps = default_warm_start_steps(self.detect_steps, every, unit_grad_every)
        return self.warm_start_steps if self.warm_start else None

    def _maybe_warm_start(self, view: LoopView, tracked: TrackedSet | None, log_step: int) -> None:
        """Once, at ``warm_start_steps``: every tracked tensor to its predicted ‖w*‖ (every rank)."""
        if (not self.warm_start or self.warm_start_done or self.warm_start_steps is None or tracked is None
                or log_step < self.warm_start_steps):
            return
        self.memory.warm_start_done = True
        logged: dict[str, float] = {}
        for (oi, gi), members in tracked.by_group.items():
            opt = view.optimizers[oi]
            label = group_label(view.optimizers, oi, gi)
            factors, missing = self._target_factors(view, members, opt, gi, fallback=None)
            if missing:
                rank_zero_warn(
                    f"{self.owner}(warm_start=...): step {log_step}: group {label}: no predicted equilibrium norm for "
                    f"{first_names(missing)} (no estimate of L / the update RMS yet, or no formula for this "
                    "optimizer); they are left as they are. Give warm_start a later step."
                )
            chosen = [(t, f) for t, f in zip(members, factors) if f is not None]
            if not chosen:
                continue
            untouched, averaged = self._apply(view, [t for t, _ in chosen], [f for _, f in chosen], opt, False)
            if untouched:
                rank_zero_warn(f"{self.owner}: optimizer state {sorted(untouched)} was left unscaled at the warm start.")
            applied = logged[label] = _geometric_mean([f for _, f in chosen])
            hp = opt.param_groups[gi]
            self.memory.rescale_events.append({
                "step": log_step, "group": label, "factor": applied, "kind": "warm_start",
                "lr": [float(hp["lr"])] * 2, "weight_decay": [float(hp.get("weight_decay", 0.0))] * 2,
                "tensors": len(chosen), "averaged_models": averaged, "factors": {t.name: f for t, f in chosen},
            })
            # the transient is gone: Δ_t/Δ* is measured afresh from here (a new stage, marked rescaled)
            self.equilibrium.start_stage(label, log_step, None, True, tracked.names_of(label))
            fs = [f for _, f in chosen]
            rank_zero_info(
                f"SMD: step {log_step}: warm start, group {label}: {len(chosen)} scale-invariant tensors moved to their "
                f"predicted equilibrium norms ‖w*‖ (factors {min(fs):.4f} to {max(fs):.4f})"
            )
        self._log_rescales(view, logged, log_step)

    def _target_factors(self, view: LoopView, members: list[Tracked], opt: torch.optim.Optimizer, gi: int,
                        fallback: float | None) -> tuple[list[float | None], list[str]]:
        """Per member ‖w*‖/‖w_t‖ at the group's current (η, λ), ``fallback`` where unknown, and the names
        of those. Computed on rank 0 (which holds the estimates) and broadcast: every rank calls this."""
        norms = _norms(view, members)  # a collective for sharded tensors
        result: tuple[list[float | None], list[str]] = ([], [])
        if view.is_global_zero:
            group_theory = theory.from_param_group(opt, opt.param_groups[gi])
            for t, norm in zip(members, norms):
                target = self.target_norm(group_theory, t.name, tuple(t.param.shape))
                if target is None or not (norm > 0 and math.isfinite(norm)):
                    result[0].append(fallback)
                    result[1].append(t.name)
                else:
                    result[0].append(target / norm)
        factors, missing = view.broadcast(result, 0)
        return list(factors), list(missing)

    def _apply(self, view: LoopView, members: list[Tracked], factors: list[float | None],
               opt: torch.optim.Optimizer, scale_grads: bool) -> tuple[set[str], int]:
        """``rescale_`` (weights, optimizer state, gradients) and EMA/SWA copies, per equal-factor batch."""
        batches: dict[float, list[Tracked]] = {}
        for t, f in zip(members, factors):
            if f is not None and f != 1.0:
                batches.setdefault(float(f), []).append(t)
        untouched: set[str] = set()
        averaged = 0
        for f, batch in batches.items():
            untouched |= rescale_([t.param for t in batch], f, opt, scale_grads=scale_grads)
            averaged = max(averaged, rescale_averaged_models(view.averaged_models, [t.name for t in batch], f))
        return untouched, averaged

    def _warn_if_far(self, label: str, members: list[Tracked], log_step: int, factor: float, per_tensor: bool,
                     k_text: str = "k^(-1/4)") -> None:
        """Warn when a rescale comes while the window mean of Δ_t/Δ* is outside ±30 % (rank 0 holds it)."""
        far = []
        for t in members:
            window = self.equilibrium.window_mean(t.name)
            if window is not None and window[1] >= 3 and abs(window[0] - 1.0) > FAR_FROM_EQUILIBRIUM:
                far.append((t.name, window[0]))
        if not far:
            return
        far.sort(key=lambda x: -abs(x[1] - 1.0))
        listed = first_names([f"{n} ({r:.2f})" for n, r in far])
        lo, hi = min(r for _, r in far), max(r for _, r in far)
        span = f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}"
        head = (f"{self.owner}: step {log_step}: group {label} is rescaled while {len(far)} of its {len(members)} "
                f"scale-invariant tensors are away from equilibrium: the window mean of Δ_t/Δ* is {listed} "
                f"(outside 1 ± {FAR_FROM_EQUILIBRIUM:.0%}). ")
        if per_tensor:
            rank_zero_warn(head + "rescale='equilibrium' moves each of them to its predicted new equilibrium norm from "
                           "the running L (or update RMS), so Δ_t should start at the new Δ*; if it does not, the "
                           "estimate is stale: check smd/unit_grad_sq, or let the stage before the change run longer.")
        else:
            rank_zero_warn(head + f"The fixed factor {factor:.4f} ({k_text}) is exact only at equilibrium (SMD paper "
                           f"§5.2): it keeps Δ_t/Δ*, so expect Δ_t at about {span} × the new Δ* after it. "
                           f"To put Δ_t at the new Δ*, use {self.owner}(rescale='equilibrium') (Hydra: smd=equilibrium); "
                           "to be at equilibrium before the drop, use warm_start=True (smd=warm_start) or a longer "
                           "stage before it.")

    def _start_stage(self, view: LoopView, tracked: TrackedSet | None, opt: torch.optim.Optimizer, gi: int,
                     key: str, last: HParams, current: HParams, log_step: int, rescaled: bool) -> None:
        new = theory.from_param_group(opt, opt.param_groups[gi])
        predicted = None
        if new.family in theory.COUPLED_FAMILIES and min(last) > 0 and min(current) > 0:
            predicted = theory.steps_to_equilibrium(last[0] * (1 - new.dampening), new.effective_lr, last[1],
                                                    new.weight_decay, new.momentum)
        elif new.decoupled and min(last) > 0 and min(current) > 0:
            lr_old, wd_old = theory.effective_hparams(opt, opt.param_groups[gi], last)  # λ_eff, as new.weight_decay
            predicted = theory.steps_to_equilibrium_decoupled(lr_old, new.lr, wd_old, new.weight_decay)
        names = tracked.names_of(key) if tracked is not None else []
        self.equilibrium.start_stage(key, log_step, predicted, rescaled, names)
        if predicted is not None and (names or tracked is None) and view.is_global_zero:  # no tracked tensor: nothing to predict
            self.publish({f"smd/steps_to_equilibrium/predicted/{key}": float(predicted)}, log_step)


def _effective(optimizer: torch.optim.Optimizer, group: dict[str, Any], old: HParams, new: HParams) -> tuple[HParams, HParams]:
    """(η, λ_eff) of both sides of a change: a decay tied to η (timm's ``corrected_weight_decay``) moves
    no equilibrium at an LR change (``theory.effective_weight_decay``)."""
    return theory.effective_hparams(optimizer, group, old), theory.effective_hparams(optimizer, group, new)


def drop_exponent(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> float:
    """e of the group's family (‖w*‖ ∝ (η/λ)^e): 1/4 SGD/SGDM/Nesterov, 1/2 AdamW/Lion/Muon; 1/4 (the
    paper's) for optimizers without a formula. Only called at an (η, λ) change."""
    exponent = theory.from_param_group(optimizer, group).norm_exponent
    return 0.25 if exponent is None else exponent


def _k_text(exponent: float) -> str:
    return f"k^(-1/{round(1 / exponent)})"


def _geometric_mean(factors: list[float | None]) -> float:
    logs = [math.log(f) for f in factors if f is not None and f > 0]
    return math.exp(math.fsum(logs) / len(logs)) if logs else 1.0


@torch.no_grad()
def _norms(view: LoopView, members: list[Tracked]) -> list[float]:
    """‖w_t‖ of each member now (shards summed across ranks: every rank calls this)."""
    params = [t.param for t in members]
    sq = torch.stack([local(p).detach().float().pow(2).sum() for p in params]).unsqueeze(0)
    reduce = make_reduce_fn(params, flat_shards=view.flat_shards, process_group=view.process_group)
    if reduce is not None:
        sq = reduce(sq)
    return sq[0].double().sqrt().tolist()
