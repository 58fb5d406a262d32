"""``SMDCallback``: the Lightning hooks that wire detection, measurement, logging and rescale."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_smd import report, theory, wandb_extras
from lightning_smd.detect import (
    Candidate,
    DataflowRecorder,
    RadialCosineCheck,
    clean_name,
    decide,
    normalization_parameters,
    select,
)
from lightning_smd.distributed import check_supported, is_sharded, make_reduce_fn
from lightning_smd.equilibrium import EquilibriumTracker
from lightning_smd.estimates import RunningMean
from lightning_smd.history import History
from lightning_smd.measure import GroupSlice
from lightning_smd.rescale import RescalePolicy, rescale_
from lightning_smd.series import RunSeries
from lightning_smd.steps import Finished, StepRecorder, choose_mode, radial_floor
from lightning_smd.summary import DetectionRow, format_detection_report

__all__ = ["SMDCallback"]

_DETECT_MODES = ("auto", "structural", "numerical")
_STATE_VERSION = 1
NameFilter = str | Sequence[str] | Callable[[str], bool] | None


class _TensorKeys(NamedTuple):
    angular_update: str
    angular_update_theory: str
    weight_norm: str
    weight_norm_theory: str
    unit_grad_sq: str


@dataclass
class _Tracked:
    """A trainable parameter and where it lives."""

    name: str
    param: Tensor
    optimizer_index: int
    group_index: int
    norm_affine: bool = False  # γ/β of a normalization layer: never discovered numerically


class SMDCallback(pl.Callback):
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
            drops by at least ``rescale_min_drop``, multiply its scale-invariant tensors by
            ((η'λ)/(ηλ'))^(1/4) before the next step; ``"continuous"``: on every change (cosine-like
            schedules), with η floored at ``rescale_min_lr_ratio`` × its peak.
        rescale_min_drop, rescale_min_lr_ratio, rescale_on_increase: see
            :class:`lightning_smd.rescale.RescalePolicy`.
        include, exclude: regex, list of regexes or ``callable(name) -> bool`` over parameter names,
            applied after detection.
        detect: ``"auto"`` (structural candidates confirmed numerically, plus tensors found
            numerically), ``"structural"`` or ``"numerical"``.
        detect_steps: optimizer steps, after the first update, over which the radial cosine
            |⟨g, w⟩|/(‖g‖‖w‖) is checked.
        radial_threshold: a tensor is numerically scale-invariant when its radial cosine stays below this.
        ema_steps: time constant, in optimizer steps, of the running estimate of L.
        unit_grad_every: sample L at most every this many steps (the first measured step of each
            block of this many); measuring every step then skips the gradient reads in between.
        equilibrium_tolerance, equilibrium_window: equilibrium is reached when the mean of
            Δ_t/Δ* over ``equilibrium_window`` steps is within ``equilibrium_tolerance`` of 1.
        figures_every_n_steps: also render the figures periodically (rank 0); they are always
            rendered at the end of fit.
        figures_dir: where figures go; default ``<trainer.log_dir or default_root_dir>/smd``.
        verbose: print the detection report (and the equilibrium summary at the end) on rank 0.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        rescale: bool | str = False,
        include: NameFilter = None,
        exclude: NameFilter = None,
        detect: str = "auto",
        detect_steps: int = 3,
        radial_threshold: float = 1e-4,
        ema_steps: float = 200.0,
        unit_grad_every: int = 8,
        rescale_min_drop: float = 2.0,
        rescale_min_lr_ratio: float = 1e-3,
        rescale_on_increase: bool = False,
        equilibrium_tolerance: float = 0.1,
        equilibrium_window: int = 200,
        figures_every_n_steps: int | None = None,
        figures_dir: str | None = None,
        verbose: bool = True,
    ) -> None:
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"SMDCallback(log_every_n_steps=...) must be a positive int or None, got {log_every_n_steps!r}")
        if detect not in _DETECT_MODES:
            raise ValueError(f"SMDCallback(detect=...) must be one of {_DETECT_MODES}, got {detect!r}")
        if not isinstance(detect_steps, int) or detect_steps < 1:
            raise ValueError(f"SMDCallback(detect_steps=...) must be an int >= 1, got {detect_steps!r}")
        if not radial_threshold > 0:
            raise ValueError(f"SMDCallback(radial_threshold=...) must be > 0, got {radial_threshold!r}")
        if figures_every_n_steps is not None and figures_every_n_steps < 1:
            raise ValueError(f"SMDCallback(figures_every_n_steps=...) must be >= 1 or None, got {figures_every_n_steps!r}")
        if rescale not in (False, True, "drop", "continuous"):
            raise ValueError(f"SMDCallback(rescale=...) must be False, True, 'drop' or 'continuous', got {rescale!r}")
        select([], include=include, exclude=exclude)  # validates the filters now, not at fit start
        self.log_every_n_steps = log_every_n_steps
        self.rescale = rescale
        self.policy = (
            RescalePolicy("continuous" if rescale == "continuous" else "drop", rescale_min_drop, rescale_min_lr_ratio,
                          rescale_on_increase)
            if rescale
            else None
        )
        self.include = include
        self.exclude = exclude
        self.detect = detect
        if not isinstance(unit_grad_every, int) or unit_grad_every < 1:
            raise ValueError(f"SMDCallback(unit_grad_every=...) must be an int >= 1, got {unit_grad_every!r}")
        self.unit_grad_every = unit_grad_every
        self.detect_steps = detect_steps
        self.radial_threshold = radial_threshold
        self.figures_every_n_steps = figures_every_n_steps
        self.figures_dir = figures_dir
        self.verbose = verbose

        # state that survives checkpoints
        self.unit_grad = RunningMean(ema_steps)
        self.equilibrium = EquilibriumTracker(equilibrium_tolerance, equilibrium_window)
        self.rescale_events: list[dict[str, Any]] = []
        self._last_hparams: dict[str, tuple[float, float]] = {}
        self._peak_lr: dict[str, float] = {}
        self._saved_names: list[str] | None = None
        self._deferred: dict[str, dict[str, Any]] = {}

        self.candidates: dict[str, Candidate] = {}
        self.records = History()
        self._tracked: list[_Tracked] = []
        self._recorder: DataflowRecorder | None = None
        self._structural: dict[str, Candidate] | None = None
        self._radial: dict[int, RadialCosineCheck] | None = None  # one per optimizer
        self._hook_calls: dict[int, int] = {}
        self._measurer: StepRecorder | None = None
        self.skipped_steps = 0  # measured steps the GradScaler skipped (not logged)
        self._names: list[str] = []
        self._key_cache: dict[str, _TensorKeys] = {}
        self._groups: list[str] = []
        self._measure_on_all_ranks = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(log_every_n_steps=self.log_every_n_steps, detect=self.detect)

    def _every(self, trainer: pl.Trainer) -> int:
        return self.log_every_n_steps or max(int(trainer.log_every_n_steps), 1)

    # ------------------------------------------------------------------ setup
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_supported(trainer)
        self._tracked = _trainable(trainer, pl_module)
        self._measurer = None
        self._radial = None
        self._hook_calls = {}
        self._structural = None if self.detect != "numerical" else {}
        if not self._tracked:
            rank_zero_warn("SMDCallback: the optimizers hold no parameters; nothing to measure.")
        if trainer.is_global_zero:
            wandb_extras.setup(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._measurer is None and self._saved_names is not None:
            self._resume_detection(trainer)
        elif self._structural is None and self._recorder is None and self._tracked:
            self._recorder = DataflowRecorder(pl_module)
            self._recorder.start()
        self._check_hparams(trainer)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._stop_recorder()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_recorder()

    # --------------------------------------------------------------- detection
    def _stop_recorder(self) -> None:
        if self._recorder is not None:
            recorder, self._recorder = self._recorder, None
            self._structural = recorder.stop()

    def _detection_step(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Advance detection by one step of ``optimizer``; build the measurer once it is decided.

        Radial cosines are checked per optimizer, on that optimizer's own tensors and steps (with
        several optimizers, e.g. a GAN's, the others' gradients are stale or absent).
        """
        self._stop_recorder()
        if self._structural is None:
            return
        if self.detect == "structural":
            self._finish_detection(trainer, {})
            return
        key = id(optimizer)
        calls = self._hook_calls[key] = self._hook_calls.get(key, 0) + 1
        if calls == 1:  # radial cosines are only trustworthy after this optimizer's first update
            return
        checks = self._radial = self._radial if self._radial is not None else {}
        if key not in checks:
            params = [(t.name, t.param) for t in self._tracked if trainer.optimizers[t.optimizer_index] is optimizer]
            checks[key] = RadialCosineCheck(params, reduce_fn=make_reduce_fn(trainer.strategy, [p for _, p in params]))
        checks[key].update()
        stepping = {id(trainer.optimizers[t.optimizer_index]) for t in self._tracked}
        counts = [checks[k].steps if k in checks else 0 for k in stepping]
        # all optimizers checked, or one of them for long (another one may step rarely, or never)
        if min(counts) >= self.detect_steps or max(counts) >= 4 * self.detect_steps:
            cosines: dict[str, float] = {}
            for check in checks.values():
                cosines.update(check.result())
            self._radial = None
            self._finish_detection(trainer, cosines)

    def _finish_detection(self, trainer: pl.Trainer, cosines: dict[str, float]) -> None:
        tracked_names = {t.name for t in self._tracked}
        structural = {n: c for n, c in (self._structural or {}).items() if n in tracked_names}
        norm_affine = [t.name for t in self._tracked if t.norm_affine]
        # 16-bit gradients: structure is confirmed at the precision's floor, discoveries stay strict
        confirm = max(self.radial_threshold, radial_floor(trainer))
        chosen, rejected = decide(structural, cosines, self.detect, self.radial_threshold, norm_affine, confirm)
        keep = set(select(list(chosen), include=self.include, exclude=self.exclude))
        chosen = {n: c for n, c in chosen.items() if n in keep}
        # Every rank must track the same tensors: rank 0 decides.
        chosen = trainer.strategy.broadcast(chosen, src=0)
        self.candidates = chosen
        self._build_measurer(trainer, [t for t in self._tracked if t.name in chosen])
        # detection ends in on_before_optimizer_step: gradients exist and must follow the weights
        self._apply_deferred_rescales(trainer, scale_grads=True)
        if self.verbose:
            rank_zero_info(self._detection_report(trainer, rejected))

    def _resume_detection(self, trainer: pl.Trainer) -> None:
        """After a resume, track exactly the tensors the checkpointed run tracked."""
        names, self._saved_names = set(self._saved_names or ()), None
        known = {t.name for t in self._tracked}
        if missing := sorted(names - known):
            rank_zero_warn(f"SMDCallback: {len(missing)} tensors tracked before the resume are gone: {missing[:5]}")
        self._stop_recorder()
        self._structural = {}
        self.candidates = {n: Candidate(n, "restored from checkpoint", "checkpoint") for n in sorted(names & known)}
        self._build_measurer(trainer, [t for t in self._tracked if t.name in self.candidates])
        self._apply_deferred_rescales(trainer, scale_grads=False)  # at batch start: no gradients yet

    def _build_measurer(self, trainer: pl.Trainer, tracked: list[_Tracked]) -> None:
        by_group: dict[tuple[int, int], list[_Tracked]] = {}
        for t in tracked:
            by_group.setdefault((t.optimizer_index, t.group_index), []).append(t)
        slices: list[GroupSlice] = []
        self._names, self._groups = [], []
        for (oi, gi), members in sorted(by_group.items()):
            optimizer = trainer.optimizers[oi]
            params = [m.param for m in members]
            slices.append(GroupSlice(optimizer, gi, params, len(self._names), choose_mode(trainer, optimizer, gi, params)))
            self._names.extend(m.name for m in members)
            self._groups.extend([_group_label(trainer, oi, gi)] * len(members))
        params = [p for s in slices for p in s.params]
        self._measure_on_all_ranks = is_sharded(trainer.strategy, params)
        self._measurer = (
            StepRecorder(slices, make_reduce_fn(trainer.strategy, params), self.unit_grad_every) if slices else None
        )
        for t in tracked:
            if float(trainer.optimizers[t.optimizer_index].param_groups[t.group_index].get("weight_decay", 0.0)) <= 0:
                rank_zero_warn(
                    f"SMDCallback: {t.name} is scale-invariant but its param group has weight_decay=0: "
                    "it has no equilibrium, its norm grows and its angular update decays."
                )

    def _detection_report(self, trainer: pl.Trainer, rejected: dict[str, str]) -> str:
        rows = []
        for t in self._tracked:
            if t.name not in self.candidates:
                continue
            optimizer = trainer.optimizers[t.optimizer_index]
            rows.append(
                DetectionRow(
                    name=t.name,
                    shape=tuple(t.param.shape),
                    reason=self.candidates[t.name].reason,
                    group=_group_label(trainer, t.optimizer_index, t.group_index),
                    theory=theory.from_param_group(optimizer, optimizer.param_groups[t.group_index]),
                )
            )
        decayed_other = sum(
            1
            for t in self._tracked
            if t.name not in self.candidates
            and float(trainer.optimizers[t.optimizer_index].param_groups[t.group_index].get("weight_decay", 0.0)) > 0
        )
        return format_detection_report(rows, rejected=rejected, decayed_not_invariant=decayed_other, total=len(self._tracked))

    # -------------------------------------------------------- LR changes, rescale
    def _check_hparams(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Compare every group's (lr, weight_decay) with the last seen; start stages and rescale."""
        log_step = trainer.fit_loop.epoch_loop._batches_that_stepped
        factors: dict[str, float] = {}
        for oi, opt in enumerate(trainer.optimizers):
            if optimizer is not None and opt is not optimizer:
                continue
            for gi, group in enumerate(opt.param_groups):
                key = _group_label(trainer, oi, gi)
                current = (float(group["lr"]), float(group.get("weight_decay", 0.0)))
                last = self._last_hparams.get(key)
                self._last_hparams[key] = current
                self._peak_lr[key] = max(self._peak_lr.get(key, 0.0), current[0])
                if last is None or last == current:
                    continue
                factor = self.policy.factor(last, current, self._peak_lr[key]) if self.policy else None
                if factor is not None and not self._detected:
                    self._defer_rescale(key, oi, gi, factor, last, current, log_step)
                elif factor is not None and self._rescale_group(trainer, opt, oi, gi, factor, log_step, last, current,
                                                                scale_grads=optimizer is not None):
                    factors[key] = factor
                else:
                    factor = None  # no rescale, or the group holds no scale-invariant tensor
                self._start_stage(trainer, opt, gi, key, last, current, log_step, rescaled=factor is not None)
        self._log_rescales(trainer, factors, log_step)

    @property
    def _detected(self) -> bool:
        return self._measurer is not None or bool(self.candidates)

    def _defer_rescale(self, key: str, oi: int, gi: int, factor: float, last: tuple[float, float],
                       current: tuple[float, float], log_step: int) -> None:
        """An LR change before detection finished: accumulate its factor, apply it once detection is done."""
        deferred = self._deferred.get(key)
        first = deferred["lr"][0] if deferred else last
        self._deferred[key] = {"group": [oi, gi], "factor": factor * (deferred["factor"] if deferred else 1.0),
                               "lr": [list(first), list(current)]}
        if not deferred:
            rank_zero_warn(
                f"SMDCallback(rescale=...): group {key} changed lr {last[0]:g} → {current[0]:g} at step {log_step}, "
                f"before detection of the scale-invariant tensors finished (detect_steps={self.detect_steps}); "
                "the rescale is applied as soon as detection finishes."
            )

    def _apply_deferred_rescales(self, trainer: pl.Trainer, scale_grads: bool) -> None:
        log_step = trainer.fit_loop.epoch_loop._batches_that_stepped
        factors = {}
        for key, d in sorted(self._deferred.items()):
            oi, gi = d["group"]
            first, current = tuple(d["lr"][0]), tuple(d["lr"][1])
            if self._rescale_group(trainer, trainer.optimizers[oi], oi, gi, d["factor"], log_step, first, current,
                                   scale_grads=scale_grads):
                factors[key] = d["factor"]
        self._deferred = {}
        self._log_rescales(trainer, factors, log_step)

    def _log_rescales(self, trainer: pl.Trainer, factors: dict[str, float], log_step: int) -> None:
        if factors and trainer.is_global_zero:
            metrics = {"smd/rescale_factor": min(factors.values())}
            if len(factors) > 1:
                metrics.update({f"smd/rescale_factor/{k}": f for k, f in factors.items()})
            self._log(trainer, metrics, log_step)

    def _rescale_group(self, trainer: pl.Trainer, opt: torch.optim.Optimizer, oi: int, gi: int, factor: float,
                       log_step: int, last: tuple[float, float], current: tuple[float, float], scale_grads: bool) -> bool:
        """Rescale the group's scale-invariant tensors; ``False`` when it has none."""
        members = [t for t in self._tracked if t.name in self.candidates and (t.optimizer_index, t.group_index) == (oi, gi)]
        params = [t.param for t in members]
        if not params:
            return False
        untouched = rescale_(params, factor, opt, scale_grads=scale_grads)
        if untouched:
            rank_zero_warn(f"SMDCallback: optimizer state {sorted(untouched)} was left unscaled at the rescale.")
        averaged = _rescale_averaged_models(trainer, [t.name for t in members], factor)
        self.rescale_events.append({"step": log_step, "group": _group_label(trainer, oi, gi), "factor": factor,
                                    "lr": [last[0], current[0]], "weight_decay": [last[1], current[1]],
                                    "tensors": len(params), "averaged_models": averaged})
        rank_zero_info(
            f"SMD: step {log_step}: group {_group_label(trainer, oi, gi)} lr {last[0]:g} → {current[0]:g}, "
            f"weight decay {last[1]:g} → {current[1]:g}: {len(params)} scale-invariant tensors multiplied by {factor:.4f}"
        )
        return True

    def _start_stage(self, trainer: pl.Trainer, opt: torch.optim.Optimizer, gi: int, key: str,
                     last: tuple[float, float], current: tuple[float, float], log_step: int, rescaled: bool) -> None:
        group = opt.param_groups[gi]
        new = theory.from_param_group(opt, group)
        predicted = None
        if new.family in ("sgd", "sgdm") and min(last) > 0:
            predicted = theory.steps_to_equilibrium(last[0] * (1 - new.dampening), new.effective_lr, last[1],
                                                    new.weight_decay, new.momentum)
        names = [n for n, g in zip(self._names, self._groups) if g == key]
        self.equilibrium.start_stage(key, log_step, predicted, rescaled, names)
        if predicted is not None and trainer.is_global_zero:
            self._log(trainer, {f"smd/steps_to_equilibrium/predicted/{key}": float(predicted)}, log_step)

    # ------------------------------------------------------------- measurement
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if not pl_module.automatic_optimization:
            self._check_hparams(trainer, optimizer)  # a scheduler may have stepped inside training_step
        if self._measurer is None:
            self._detection_step(trainer, optimizer)
            return
        log_step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if (log_step + 1) % self._every(trainer) != 0:
            return
        if not (self._measure_on_all_ranks or trainer.is_global_zero):
            return
        self._measurer.begin(trainer, optimizer, log_step, self._every(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._measurer is None:
            return
        pending = self._measurer.finish(trainer)  # collectives (sharded): every rank that measures calls this
        if pending is None or not trainer.is_global_zero:
            return
        if pending.skipped is not None:
            both = torch.cat([pending.stats.reshape(-1), pending.skipped.reshape(-1).to(pending.stats.dtype)]).cpu()
            stats, skipped = both[:-1].reshape(pending.stats.shape), bool(both[-1])
        else:
            stats, skipped = pending.stats.cpu(), False
        if skipped:  # the GradScaler skipped the step (inf/NaN gradients): nothing moved, nothing to log
            self.skipped_steps += 1
            return
        metrics = self._metrics(stats, pending, trainer.global_step - 1)
        self._log(trainer, metrics, pending.log_step)
        if self.figures_every_n_steps and (pending.log_step + 1) % self.figures_every_n_steps < self._every(trainer):
            self._render_figures(trainer)

    def _metrics(self, stats: Tensor, pending: Finished, step: int) -> dict[str, float]:
        delta, w_norm, unit_grad_sample = stats.double().tolist()
        index = [i for s in pending.slices for i in range(s.start, s.stop)]
        names = [self._names[i] for i in index]
        groups = [self._groups[i] for i in index]
        unit_grad = self.unit_grad.update(names, unit_grad_sample, step)
        metrics: dict[str, float] = {}
        ratios: list[float] = []
        i = 0
        for s, group_theory in zip(pending.slices, pending.theories):
            delta_star = group_theory.angular_update
            for _ in s.params:
                name, d = names[i], delta[i]
                keys = self._keys(name)
                metrics[keys.angular_update] = d
                metrics[keys.weight_norm] = w_norm[i]
                metrics[keys.unit_grad_sq] = unit_grad[i]
                ratios.append(d / delta_star if delta_star else math.nan)
                if delta_star is not None:
                    metrics[keys.angular_update_theory] = delta_star
                # single h̃ samples can be negative with momentum; no prediction until the estimate is > 0
                if unit_grad[i] > 0 and (norm_sq := group_theory.equilibrium_norm_sq(unit_grad[i])) is not None:
                    metrics[keys.weight_norm_theory] = math.sqrt(norm_sq)
                i += 1
        finite = [r for r in ratios if math.isfinite(r)]
        if finite:
            metrics["smd/angular_update_ratio/mean"] = sum(finite) / len(finite)
            metrics["smd/angular_update_ratio/min"] = min(finite)
            metrics["smd/angular_update_ratio/max"] = max(finite)
        for name, reached in self.equilibrium.update(pending.log_step, groups, names, ratios).items():
            stage = self.equilibrium.current_stage(groups[names.index(name)])
            metrics[f"smd/equilibrium_step/{name}"] = float(reached)
            metrics[f"smd/steps_to_equilibrium/measured/{name}"] = float(reached - stage.start_step)
        if finite:
            metrics["smd/equilibrium/fraction"] = self.equilibrium.fraction_reached(self._groups, self._names)
        return metrics

    def _keys(self, name: str) -> _TensorKeys:
        """The metric keys of one tensor, built once (shared by every record)."""
        keys = self._key_cache.get(name)
        if keys is None:
            keys = self._key_cache[name] = _TensorKeys(*(f"smd/{kind}/{name}" for kind in _TensorKeys._fields))
        return keys

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        """Log through every logger (rank 0), and keep the record the figures are built from."""
        self.records.append(step, metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------- end of fit
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_recorder()
        if not trainer.is_global_zero:
            return
        if self.verbose and self.equilibrium.stages:
            rank_zero_info(self.equilibrium.summary())
        if self.records:
            self._render_figures(trainer, summary_table=True)

    def figures_path(self, trainer: pl.Trainer) -> Path:
        if self.figures_dir is not None:
            return Path(self.figures_dir)
        # not trainer.log_dir: it broadcasts (a collective) and this runs on rank 0 only
        return Path(_log_dir(trainer) or trainer.default_root_dir) / "smd"

    def _render_figures(self, trainer: pl.Trainer, summary_table: bool = False) -> dict[str, Path]:
        """Write the figures (rank 0) and hand them, and at the end the per-layer table, to W&B."""
        series = RunSeries.from_records(self.records)
        figures = report.save_figures(series, self.figures_path(trainer))
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        wandb_extras.log_figures(trainer, figures, step)
        wandb_extras.log_concern_charts(trainer, series, step)
        if summary_table:
            wandb_extras.log_summary_table(trainer, report.summary_rows(series), step)
        return figures

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        names = sorted(self.candidates) if self.candidates else self._saved_names
        return {
            "version": _STATE_VERSION,
            "unit_grad": self.unit_grad.state_dict(),
            "equilibrium": self.equilibrium.state_dict(),
            "last_hparams": {k: list(v) for k, v in self._last_hparams.items()},
            "peak_lr": dict(self._peak_lr),
            "rescale_events": list(self.rescale_events),
            "tracked": names,
            "deferred_rescales": dict(self._deferred),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"SMDCallback: unknown checkpoint state version {state_dict.get('version')!r}")
        self.unit_grad.load_state_dict(state_dict["unit_grad"])
        self.equilibrium.load_state_dict(state_dict["equilibrium"])
        self._last_hparams = {k: (float(v[0]), float(v[1])) for k, v in state_dict["last_hparams"].items()}
        self._peak_lr = dict(state_dict["peak_lr"])
        self.rescale_events = list(state_dict["rescale_events"])
        self._saved_names = state_dict["tracked"]
        self._deferred = dict(state_dict.get("deferred_rescales", {}))
        self._measurer = None


def _log_dir(trainer: pl.Trainer) -> str | None:
    """``trainer.log_dir`` without its broadcast: safe inside rank-zero-only code."""
    loggers = trainer.loggers
    if not loggers:
        return None
    logger = loggers[0]
    if isinstance(logger, (pl.loggers.TensorBoardLogger, pl.loggers.CSVLogger)):
        return logger.log_dir
    return logger.save_dir


def _group_label(trainer: pl.Trainer, optimizer_index: int, group_index: int) -> str:
    group = trainer.optimizers[optimizer_index].param_groups[group_index]
    label = str(group["name"]) if "name" in group else f"pg{group_index}"
    return f"opt{optimizer_index}_{label}" if len(trainer.optimizers) > 1 else label


def _rescale_averaged_models(trainer: pl.Trainer, names: list[str], factor: float) -> int:
    """Rescale the matching tensors of EMA/SWA copies kept by weight-averaging callbacks.

    Their averages would otherwise mix weights from both sides of the rescale, weighting the
    larger, older ones more. Returns how many averaged models were rescaled.
    """
    wanted = set(names)
    count = 0
    for cb in trainer.callbacks:
        averaged = getattr(cb, "_average_model", None)
        if not isinstance(averaged, torch.optim.swa_utils.AveragedModel):
            continue
        params = [p for n, p in averaged.module.named_parameters() if clean_name(n) in wanted]
        if params:
            rescale_(params, factor)
            count += 1
    return count


def _trainable(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[_Tracked]:
    """Every parameter an optimizer updates, with its clean name and (optimizer, group) indices."""
    names = {id(p): clean_name(n) for n, p in pl_module.named_parameters()}
    norm_affine = normalization_parameters(pl_module)
    tracked: list[_Tracked] = []
    seen: set[int] = set()
    for oi, optimizer in enumerate(trainer.optimizers):
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                name = names.get(id(p))
                if name is None:
                    rank_zero_warn(
                        f"SMDCallback: optimizer {oi} group {gi} holds a parameter of shape {tuple(p.shape)} "
                        "that is not a parameter of the LightningModule; it is not tracked."
                    )
                    continue
                tracked.append(_Tracked(name, p, oi, gi, name in norm_affine))
    return tracked
