"""``SMDCallback``: the Lightning hooks that wire detection, measurement, logging and rescale."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_smd import theory
from lightning_smd.detect import Candidate, DataflowRecorder, RadialCosineCheck, clean_name, select
from lightning_smd.detect import _is_norm_module as is_norm_module
from lightning_smd.distributed import is_sharded, make_reduce_fn
from lightning_smd.estimates import RunningMean
from lightning_smd.measure import GroupSlice, StepMeasurer, measurement_mode
from lightning_smd.summary import DetectionRow, format_detection_report

__all__ = ["SMDCallback"]

_DETECT_MODES = ("auto", "structural", "numerical")
NameFilter = str | Sequence[str] | Callable[[str], bool] | None


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
    ``log_every_n_steps`` optimizer steps:

    * ``smd/angular_update/{name}``: the angle Δ_t (radians) the step turned the tensor by,
    * ``smd/angular_update_theory/{name}``: Δ* from the tensor's param group at that step,
    * ``smd/weight_norm/{name}`` and ``smd/weight_norm_theory/{name}``: ‖w_t‖ and the predicted
      equilibrium ‖w*‖ (SGD / SGD with momentum) from a running estimate of the unit gradient,
    * ``smd/unit_grad_sq/{name}``: that running estimate of L,
    * ``smd/angular_update_ratio/{mean,min,max}``: Δ_t/Δ* across tensors.

    Args:
        log_every_n_steps: measure and log every this many optimizer steps (1 = every step);
            ``None`` uses the Trainer's ``log_every_n_steps``. Unmeasured steps cost nothing.
        rescale: ``False`` (monitor only), ``True``/``"drop"`` (rescale the scale-invariant tensors
            of a param group by ((η'λ)/(ηλ'))^(1/4) when its LR drops), or ``"continuous"``.
        include, exclude: regex, list of regexes or ``callable(name) -> bool`` over parameter names,
            applied after detection.
        detect: ``"auto"`` (structural candidates confirmed numerically, plus tensors found
            numerically), ``"structural"`` or ``"numerical"``.
        detect_steps: optimizer steps, after the first update, over which the radial cosine
            |⟨g, w⟩|/(‖g‖‖w‖) is checked.
        radial_threshold: a tensor is numerically scale-invariant when its radial cosine stays below this.
        ema_steps: time constant, in optimizer steps, of the running estimate of L.
        figures_every_n_steps: also render the figures periodically (rank 0); they are always
            rendered at the end of fit.
        figures_dir: where figures go; default ``<trainer.log_dir or default_root_dir>/smd``.
        verbose: print the detection report on rank 0 once detection is complete.
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
        if rescale:
            raise NotImplementedError("SMDCallback(rescale=...) is not implemented yet; use rescale=False")
        select([], include=include, exclude=exclude)  # validates the filters now, not at fit start
        self.log_every_n_steps = log_every_n_steps
        self.rescale = rescale
        self.include = include
        self.exclude = exclude
        self.detect = detect
        self.detect_steps = detect_steps
        self.radial_threshold = radial_threshold
        self.figures_every_n_steps = figures_every_n_steps
        self.figures_dir = figures_dir
        self.verbose = verbose

        self.unit_grad = RunningMean(ema_steps)
        self.candidates: dict[str, Candidate] = {}
        self.records: list[tuple[int, dict[str, float]]] = []
        self._tracked: list[_Tracked] = []
        self._recorder: DataflowRecorder | None = None
        self._structural: dict[str, Candidate] | None = None
        self._radial: RadialCosineCheck | None = None
        self._measurer: StepMeasurer | None = None
        self._pending: tuple[int, int, list[theory.GroupTheory]] | None = None  # (log step, global step, theories)
        self._names: list[str] = []
        self._measure_on_all_ranks = False

    # ------------------------------------------------------------------ setup
    @property
    def state_key(self) -> str:
        return self._generate_state_key(log_every_n_steps=self.log_every_n_steps, detect=self.detect)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tracked = _trainable(trainer, pl_module)
        self._measurer = None
        self._pending = None
        self._radial = None
        self._structural = None if self.detect != "numerical" else {}
        if not self._tracked:
            rank_zero_warn("SMDCallback: the optimizers hold no parameters; nothing to measure.")

    def _every(self, trainer: pl.Trainer) -> int:
        return self.log_every_n_steps or max(int(trainer.log_every_n_steps), 1)

    # --------------------------------------------------------------- detection
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._structural is None and self._recorder is None and self._tracked:
            self._recorder = DataflowRecorder(pl_module)
            self._recorder.start()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._stop_recorder()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_recorder()

    def _stop_recorder(self) -> None:
        if self._recorder is not None:
            recorder, self._recorder = self._recorder, None
            self._structural = recorder.stop()

    def _detection_step(self, trainer: pl.Trainer) -> None:
        """Advance detection by one optimizer step; build the measurer once it is decided."""
        self._stop_recorder()
        if self._structural is None:
            return
        if self.detect == "structural":
            self._finish_detection(trainer, {})
            return
        if trainer.global_step < 1:  # radial cosines are only trustworthy after the first update
            return
        if self._radial is None:
            params = [(t.name, t.param) for t in self._tracked]
            self._radial = RadialCosineCheck(params, reduce_fn=make_reduce_fn(trainer.strategy, [p for _, p in params]))
        self._radial.update()
        if self._radial.steps >= self.detect_steps:
            cosines = self._radial.result()
            self._radial = None
            self._finish_detection(trainer, cosines)

    def _finish_detection(self, trainer: pl.Trainer, cosines: dict[str, float]) -> None:
        structural = self._structural or {}
        chosen: dict[str, Candidate] = {}
        rejected: dict[str, str] = {}
        for t in self._tracked:
            cos = cosines.get(t.name, math.nan)
            numerically = cos < self.radial_threshold  # False for nan
            if t.name in structural:
                if self.detect == "structural" or numerically:
                    chosen[t.name] = structural[t.name]
                else:
                    rejected[t.name] = f"{structural[t.name].reason}, but radial cosine {cos:.2e} >= {self.radial_threshold:g}"
            elif numerically and not t.norm_affine:
                # A norm layer's γ (β≈0 early, followed by ReLU→conv→BN) has radial cosines as small
                # as a true invariant's during the first steps; it is only invariant jointly with β.
                chosen[t.name] = Candidate(t.name, f"numerical: radial cosine {cos:.2e}", "numerical")
        keep = set(select(list(chosen), include=self.include, exclude=self.exclude))
        chosen = {n: c for n, c in chosen.items() if n in keep}
        # Every rank must track the same tensors: rank 0 decides.
        chosen = trainer.strategy.broadcast(chosen, src=0)
        self.candidates = chosen
        tracked = [t for t in self._tracked if t.name in chosen]
        self._build_measurer(trainer, tracked)
        if self.verbose:
            rank_zero_info(self._detection_report(trainer, tracked, rejected, cosines))

    def _build_measurer(self, trainer: pl.Trainer, tracked: list[_Tracked]) -> None:
        slices: list[GroupSlice] = []
        start = 0
        by_group: dict[tuple[int, int], list[_Tracked]] = {}
        for t in tracked:
            by_group.setdefault((t.optimizer_index, t.group_index), []).append(t)
        names: list[str] = []
        for (oi, gi), members in sorted(by_group.items()):
            optimizer = trainer.optimizers[oi]
            group = optimizer.param_groups[gi]
            slices.append(GroupSlice(optimizer, gi, [m.param for m in members], start, measurement_mode(optimizer, group)))
            names.extend(m.name for m in members)
            start += len(members)
        params = [p for s in slices for p in s.params]
        self._names = names
        self._measure_on_all_ranks = is_sharded(trainer.strategy, params)
        self._measurer = StepMeasurer(slices, make_reduce_fn(trainer.strategy, params)) if slices else None

    def _detection_report(self, trainer: pl.Trainer, tracked: list[_Tracked], rejected: dict[str, str], cosines: dict[str, float]) -> str:
        rows = []
        for t in tracked:
            optimizer = trainer.optimizers[t.optimizer_index]
            group = optimizer.param_groups[t.group_index]
            rows.append(
                DetectionRow(
                    name=t.name,
                    shape=tuple(t.param.shape),
                    reason=self.candidates[t.name].reason,
                    group=f"{t.optimizer_index}/{t.group_index}" if len(trainer.optimizers) > 1 else str(t.group_index),
                    theory=theory.from_param_group(optimizer, group),
                )
            )
        chosen = {t.name for t in tracked}
        decayed_other = sum(
            1
            for t in self._tracked
            if t.name not in chosen
            and float(trainer.optimizers[t.optimizer_index].param_groups[t.group_index].get("weight_decay", 0.0)) > 0
        )
        return format_detection_report(rows, rejected=rejected, decayed_not_invariant=decayed_other, total=len(self._tracked))

    # ------------------------------------------------------------- measurement
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._measurer is None:
            self._detection_step(trainer)
            return
        log_step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if (log_step + 1) % self._every(trainer) != 0:
            return
        if not (self._measure_on_all_ranks or trainer.is_global_zero):
            return
        active = self._measurer.before_step(optimizer)
        theories = [theory.from_param_group(s.optimizer, s.group) for s in active]
        self._pending = (log_step, trainer.global_step, theories)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._pending is None or self._measurer is None:
            return
        log_step, global_step, theories = self._pending
        if trainer.global_step <= global_step:  # the optimizer did not step (yet)
            return
        self._pending = None
        stats, slices = self._measurer.after_step()
        if not trainer.is_global_zero:
            return
        metrics = self._metrics(stats.cpu(), slices, theories, trainer.global_step - 1)
        self.records.append((log_step, metrics))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=log_step)
        if self.figures_every_n_steps and (log_step + 1) % self.figures_every_n_steps < self._every(trainer):
            self._render_figures(trainer)

    def _metrics(self, stats: Tensor, slices: list[GroupSlice], theories: list[theory.GroupTheory], step: int) -> dict[str, float]:
        delta, w_norm, unit_grad_sample = stats.double()
        names = [self._names[i] for s in slices for i in range(s.start, s.stop)]
        unit_grad = self.unit_grad.update(names, unit_grad_sample, step)
        metrics: dict[str, float] = {}
        ratios = []
        i = 0
        for s, group_theory in zip(slices, theories):
            delta_star = group_theory.angular_update
            for _ in s.params:
                name = names[i]
                d = float(delta[i])
                metrics[f"smd/angular_update/{name}"] = d
                metrics[f"smd/weight_norm/{name}"] = float(w_norm[i])
                metrics[f"smd/unit_grad_sq/{name}"] = float(unit_grad[i])
                if delta_star is not None:
                    metrics[f"smd/angular_update_theory/{name}"] = delta_star
                    ratios.append(d / delta_star)
                norm_sq = group_theory.equilibrium_norm_sq(float(unit_grad[i])) if math.isfinite(unit_grad[i]) else None
                if norm_sq is not None:
                    metrics[f"smd/weight_norm_theory/{name}"] = math.sqrt(norm_sq)
                i += 1
        if ratios:
            metrics["smd/angular_update_ratio/mean"] = sum(ratios) / len(ratios)
            metrics["smd/angular_update_ratio/min"] = min(ratios)
            metrics["smd/angular_update_ratio/max"] = max(ratios)
        return metrics

    # ------------------------------------------------------------- end of fit
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_recorder()
        if trainer.is_global_zero and self.records:
            self._render_figures(trainer)

    def figures_path(self, trainer: pl.Trainer) -> Path:
        if self.figures_dir is not None:
            return Path(self.figures_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "smd"

    def _render_figures(self, trainer: pl.Trainer) -> dict[str, Path]:
        try:
            from lightning_smd import report
            from lightning_smd.series import RunSeries
        except ImportError:  # pragma: no cover - optional pieces
            return {}
        return report.save_figures(RunSeries.from_records(self.records), self.figures_path(trainer))

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "unit_grad": self.unit_grad.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != 1:
            raise ValueError(f"SMDCallback: unknown checkpoint state version {state_dict.get('version')!r}")
        self.unit_grad.load_state_dict(state_dict["unit_grad"])


def _trainable(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[_Tracked]:
    """Every parameter an optimizer updates, with its clean name and (optimizer, group) indices."""
    names = {id(p): clean_name(n) for n, p in pl_module.named_parameters()}
    norm_affine = {id(p) for m in pl_module.modules() if is_norm_module(m) for p in m.parameters(recurse=False)}
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
                tracked.append(_Tracked(name, p, oi, gi, id(p) in norm_affine))
    return tracked

