"""Which optimizer steps really happened, and how to measure them, under every training setup.

The callback's measurement is two calls around one optimizer step
(:meth:`~lightning_smd.measure.StepMeasurer.before_step` in ``on_before_optimizer_step``,
:meth:`~lightning_smd.measure.StepMeasurer.after_step` in ``on_train_batch_end``). What varies
with the setup, and is handled here:

* **Manual optimization / several optimizers** (GANs): the hook fires inside each ``opt.step()``,
  several times per batch; each optimizer has its own :class:`StepMeasurer` and pending step,
  all finished together at the end of the batch (Lightning's log step advances once per batch).
* **GradScaler (16-mixed)**: a step with inf/NaN gradients is skipped by ``scaler.step`` while
  ``global_step`` and the schedulers advance. The scale before the step is kept (on device) and
  compared after ``scaler.update()``: a lower scale means the step was skipped, and it is not
  logged (it would read Δ=0, or garbage from the momentum buffer). Fused optimizers unscale inside
  their step: in the hook their gradients are still multiplied by the scale, so the gradient
  statistics are divided by it (and "grad" mode, which re-reads gradients after the step, becomes
  "snapshot").
* **Low-precision parameters** (``bf16-true``, ``16-true``): the applied update is the rounded
  difference of two low-precision tensors, not ``−η·buf``; such groups are measured from a
  snapshot (statistics are accumulated in fp32 either way).

DeepSpeed (whose hook fires on every micro-batch) is refused at fit start, see
:func:`lightning_smd.distributed.check_supported`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_smd import theory
from lightning_smd.measure import GroupSlice, ReduceFn, StepMeasurer, measurement_mode

__all__ = ["StepRecorder", "choose_mode", "grad_scaler", "radial_floor"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def grad_scaler(trainer: pl.Trainer) -> Any | None:
    """The enabled ``GradScaler`` (or ``ShardedGradScaler``) of the precision plugin, if any."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    return scaler


def handles_unscaling(optimizer: torch.optim.Optimizer) -> bool:
    """Fused optimizers unscale inside ``step()``: their gradients are still scaled in the hook."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def radial_floor(trainer: pl.Trainer) -> float:
    """The radial cosine ``|⟨g, w⟩|/(‖g‖‖w‖)`` a truly invariant tensor can show at this precision.

    In fp32 it is ~1e-6; gradients computed in 16-bit (autocast or 16-bit parameters) carry
    rounding of the order of the format's epsilon, so invariant tensors read 1e-4 to 1e-3
    (bf16, 8 mantissa bits), and the confirmation of structural candidates must allow for it.
    """
    precision = str(getattr(trainer, "precision", "32-true"))
    if "bf16" in precision or "transformer-engine" in precision:
        return 1e-2
    if "16" in precision:
        return 3e-3
    return 0.0


def choose_mode(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, group_index: int, params: list[Tensor]) -> str:
    """:func:`~lightning_smd.measure.measurement_mode`, made safe for the precision in use."""
    mode = measurement_mode(optimizer, optimizer.param_groups[group_index])
    if mode == "snapshot":
        return mode
    if any(p.dtype in _LOW_PRECISION for p in params):
        return "snapshot"  # the applied update is rounded to the parameter dtype: measure what was applied
    if mode in ("grad", "nesterov") and grad_scaler(trainer) is not None and handles_unscaling(optimizer):
        return "snapshot"  # the gradients read after a fused step are still scaled
    return mode


@dataclass
class _Pending:
    measurer: StepMeasurer
    log_step: int
    global_step: int
    slices: list[GroupSlice]
    theories: list[theory.GroupTheory]
    scale_before: Tensor | None  # the GradScaler's scale before the step (device tensor)
    scaler: Any | None


@dataclass
class Finished:
    """A measured step whose optimizer(s) stepped: ``stats`` is ``[3, n + m]`` over ``slices``: the
    ``n`` tensors, then the ``m`` invariance units of the slices with per-unit statistics."""

    log_step: int
    global_step: int
    stats: Tensor
    slices: list[GroupSlice]
    theories: list[theory.GroupTheory]
    skipped: Tensor | None  # device bool: the GradScaler skipped (one of) the step(s)

    def to_host(self) -> tuple[Tensor, bool]:
        """``(stats on the host, whether the GradScaler skipped the step)``: one transfer."""
        if self.skipped is None:
            return self.stats.cpu(), False
        both = torch.cat([self.stats.reshape(-1), self.skipped.reshape(-1).to(self.stats.dtype)]).cpu()
        return both[:-1].reshape(self.stats.shape), bool(both[-1])


class StepRecorder:
    """Measured optimizer steps in flight, one :class:`StepMeasurer` per optimizer.

    ``slices`` (all tracked param groups, any optimizer) are split by optimizer; ``make_reduce``
    builds, from one optimizer's tracked tensors, the function that sums their partial sums across
    shards (each optimizer's measurer passes its own columns only). Every rank that measures must
    call :meth:`begin` and :meth:`finish` in the same order (they run in hooks called on every rank).
    """

    def __init__(self, slices: list[GroupSlice], make_reduce: Callable[[list[Tensor]], ReduceFn | None],
                 unit_grad_every: int = 1, channel_every: int = 1) -> None:
        # The unit-gradient statistics (with momentum: 3 reads of the tracked tensors' size, on top of 4)
        # are sampled at most every `unit_grad_every` steps: the running L averages over ~200 steps
        # anyway. Which steps sample is a function of the step alone (samples_unit_grad), so a
        # resumed run, every rank and every strategy sample the same ones.
        self.unit_grad_every = unit_grad_every
        # Per-unit statistics (slices with `units`) on the measured step that ends each block of
        # `channel_every` optimizer steps (every measured step at a cadence >= channel_every)
        self.channel_every = channel_every
        by_optimizer: dict[int, list[GroupSlice]] = {}
        for s in slices:
            by_optimizer.setdefault(id(s.optimizer), []).append(s)
        # built on every rank in the same order: a reduce function may create process groups
        self._measurers = {key: StepMeasurer(group, make_reduce([p for s in group for p in s.params]))
                           for key, group in by_optimizer.items()}
        self._pending: dict[int, _Pending] = {}

    @property
    def slices(self) -> list[GroupSlice]:
        return [s for m in self._measurers.values() for s in m.slices]

    def begin(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, log_step: int, every: int = 1) -> None:
        """Before ``optimizer`` steps (final, unscaled gradients): record ``w_t`` and ``g_t``."""
        key = id(optimizer)
        measurer = self._measurers.get(key)
        if measurer is None or key in self._pending:
            return  # no tracked tensors in it, or it already stepped in this batch: measure the first step
        scaler = grad_scaler(trainer)
        scale = _scale_tensor(scaler)
        grad_scale = scale if scale is not None and handles_unscaling(optimizer) and not _unscaled(scaler, optimizer) else None
        unit_grad = samples_unit_grad(log_step, every, self.unit_grad_every)
        per_unit = samples_unit_grad(log_step + 1, every, self.channel_every)
        slices = measurer.before_step(optimizer, grad_scale=grad_scale, unit_grad=unit_grad, per_unit=per_unit)
        theories = [theory.from_param_group(s.optimizer, s.group) for s in slices]
        self._pending[key] = _Pending(measurer, log_step, trainer.global_step, slices, theories,
                                      scale.clone() if scale is not None else None, scaler)

    def finish(self, trainer: pl.Trainer) -> Finished | None:
        """After the batch: finish every pending measurement whose optimizer stepped.

        Returns the stats of all of them together (one log step), or ``None``.
        """
        if not self._pending or trainer.global_step <= min(p.global_step for p in self._pending.values()):
            return None  # nothing measured, or the optimizer did not step (yet)
        pending, self._pending = list(self._pending.values()), {}
        stats, slices, theories, skipped, n_tensors = [], [], [], None, []
        for p in pending:
            s, active = p.measurer.after_step()
            stats.append(s)
            n_tensors.append(sum(len(a.params) for a in active))
            slices.extend(active)
            theories.extend(p.theories)
            if p.scale_before is not None:
                now = _scale_tensor(p.scaler)
                # scaler.update() backs off the scale exactly when the step found inf/NaN gradients
                dropped = (now < p.scale_before) if now is not None else None
                if dropped is not None:
                    skipped = dropped if skipped is None else skipped | dropped
        first = pending[0]
        if len(stats) > 1 and any(s.units is not None for s in slices):
            # each measurer's [tensors, units] columns → [all tensors, all units]
            stats = [t[:, :k] for t, k in zip(stats, n_tensors)] + [t[:, k:] for t, k in zip(stats, n_tensors)]
        return Finished(first.log_step, first.global_step, torch.cat(stats, dim=1), slices, theories, skipped)


def samples_unit_grad(log_step: int, every: int, min_gap: int) -> bool:
    """Whether measured step ``log_step`` (one in ``every``) also samples the unit gradient.

    The first measured step of each block of ``min_gap`` steps does: every measured step when
    ``every >= min_gap``, one in ``ceil(min_gap / every)`` otherwise. Stateless on purpose.
    """
    return log_step // min_gap != (log_step - every) // min_gap


def _scale_tensor(scaler: Any | None) -> Tensor | None:
    if scaler is None:
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else None


def _unscaled(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` already ran for this step."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if not states or id(optimizer) not in states:
        return False
    stage = states[id(optimizer)].get("stage")
    return getattr(stage, "name", "") == "UNSCALED"
