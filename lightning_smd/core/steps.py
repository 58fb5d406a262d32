"""Which optimizer steps really happened, and how to measure them, under every training setup.

Measurement is two calls around one optimizer step, made by torch's own step hooks
(``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``, see :class:`StepHooks`):
:meth:`~lightning_smd.core.measure.StepMeasurer.before_step` in the pre-hook, with the final
gradients (after gradient clipping and the GradScaler's unscale),
:meth:`~lightning_smd.core.measure.StepMeasurer.after_step` in the post-hook. Every call of
``step()`` is one measured step; a step the GradScaler skips calls no hook and is not measured.
What varies with the setup, and is handled here:

* **Manual optimization / several optimizers** (GANs): each optimizer has its own
  :class:`StepMeasurer`; each of its steps is measured on its own (two steps of one optimizer in
  one batch are two measured steps). :meth:`StepRecorder.pop_finished` hands them over in rounds:
  the first step of every optimizer, then the second ones, ...
* **Fused optimizers under a GradScaler** unscale inside their step: in the pre-hook their
  gradients are still multiplied by the scale, so the gradient statistics are divided by it (and
  "grad" mode, which re-reads gradients after the step, becomes "snapshot").
* **Low-precision parameters** (``bf16-true``, ``16-true``): the applied update is the rounded
  difference of two low-precision tensors, not ``−η·buf``; such groups are measured from a
  snapshot (statistics are accumulated in fp32 either way).

Torch only: the loop's grad scaler and precision come from the adapter's
:class:`~lightning_smd.core.loop.LoopView`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from lightning_smd.core import theory
from lightning_smd.core.measure import GroupSlice, ReduceFn, StepMeasurer, measurement_mode

__all__ = ["Finished", "StepHooks", "StepRecorder", "choose_mode", "found_inf_of", "radial_floor"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def handles_unscaling(optimizer: torch.optim.Optimizer) -> bool:
    """Fused optimizers unscale inside ``step()``: their gradients are still scaled in the hook."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def radial_floor(precision: str) -> float:
    """The radial cosine ``|⟨g, w⟩|/(‖g‖‖w‖)`` a truly invariant tensor can show at this precision.

    In fp32 it is ~1e-6; gradients computed in 16-bit (autocast or 16-bit parameters) carry
    rounding of the order of the format's epsilon, so invariant tensors read 1e-4 to 1e-3
    (bf16, 8 mantissa bits), and the confirmation of structural candidates must allow for it.
    """
    precision = str(precision)
    if "bf16" in precision or "transformer-engine" in precision:
        return 1e-2
    if "16" in precision:
        return 3e-3
    return 0.0


def choose_mode(scaler: Any | None, optimizer: torch.optim.Optimizer, group_index: int, params: list[Tensor]) -> str:
    """:func:`~lightning_smd.core.measure.measurement_mode`, made safe for the precision in use (``scaler``:
    the loop's enabled GradScaler, or ``None``)."""
    mode = measurement_mode(optimizer, optimizer.param_groups[group_index])
    if mode == "snapshot":
        return mode
    if any(p.dtype in _LOW_PRECISION for p in params):
        return "snapshot"  # the applied update is rounded to the parameter dtype: measure what was applied
    if mode in ("grad", "nesterov") and scaler is not None and handles_unscaling(optimizer):
        return "snapshot"  # the gradients read after a fused step are still scaled
    return mode


@dataclass
class Finished:
    """Measured optimizer step(s) of one round: ``stats`` is ``[3, n + m]`` over ``slices``: the
    ``n`` tensors, then the ``m`` invariance units of the slices with per-unit statistics.
    ``log_step``: the adapter's logging step; ``step``: the optimizer's own step count before the
    step (the axis of the running estimates)."""

    log_step: int
    step: int
    stats: Tensor
    slices: list[GroupSlice]
    theories: list[theory.GroupTheory]
    # device bool: a fused optimizer was stepped by a GradScaler that found inf/NaN gradients
    # (it runs its step, and its hooks, but moves nothing)
    skipped: Tensor | None = None

    def to_host(self) -> tuple[Tensor, bool]:
        """``(stats on the host, whether the GradScaler skipped the step)``: one transfer."""
        if self.skipped is None:
            return self.stats.cpu(), False
        both = torch.cat([self.stats.reshape(-1), self.skipped.reshape(-1).to(self.stats.dtype)]).cpu()
        return both[:-1].reshape(self.stats.shape), bool(both[-1])


class StepHooks:
    """``before(optimizer, kwargs)`` and ``after(optimizer)`` around every ``step()`` of the given
    optimizers, through torch's per-optimizer step hooks; :meth:`remove` takes them all off.

    ``before`` runs when the step's gradients are final. A step given a ``closure`` (Lightning's
    automatic optimization in full precision, LBFGS-style code) computes them inside ``step()``:
    the pre-hook then wraps the closure, and ``before`` runs right after its first call (after the
    backward, Lightning's ``on_before_optimizer_step`` and gradient clipping), before the update.
    ``kwargs`` are the step's keyword arguments (a GradScaler passed ``found_inf`` to fused ones).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], before: Callable[[torch.optim.Optimizer, dict], None],
                 after: Callable[[torch.optim.Optimizer], None]) -> None:
        self._before, self._after = before, after
        self._handles: list[Any] = []
        for optimizer in optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_hook))
            self._handles.append(optimizer.register_step_post_hook(self._post_hook))

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # torch passes the step's own arguments: args[0] is the optimizer, then the closure if positional
        closure = kwargs["closure"] if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            with torch.no_grad():
                self._before(optimizer, kwargs)
            return None
        called = False

        def closure_then_before() -> Any:
            nonlocal called
            loss = closure()
            if not called:  # LBFGS calls it again between its own updates: the step began at the first
                called = True
                with torch.no_grad():
                    self._before(optimizer, kwargs)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_before}
        return (args[0], closure_then_before, *args[2:]), kwargs

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._after(optimizer)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class StepRecorder:
    """Measured optimizer steps, one :class:`StepMeasurer` per optimizer.

    ``slices`` (all tracked param groups, any optimizer) are split by optimizer; ``make_reduce``
    builds, from one optimizer's tracked tensors, the function that sums their partial sums across
    shards (each optimizer's measurer passes its own columns only). Every rank that measures must
    call :meth:`begin` and :meth:`finish` in the same order (the step hooks run on every rank).
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
        self._in_flight: dict[int, tuple[int, int, list[theory.GroupTheory], Tensor | None]] = {}
        self._finished: list[tuple[int, Finished]] = []  # (optimizer id, its measured step)

    @property
    def slices(self) -> list[GroupSlice]:
        return [s for m in self._measurers.values() for s in m.slices]

    def tracks(self, optimizer: torch.optim.Optimizer) -> bool:
        return id(optimizer) in self._measurers

    def begin(self, optimizer: torch.optim.Optimizer, log_step: int, step: int, every: int = 1,
              scaler: Any | None = None, found_inf: Tensor | None = None) -> None:
        """In ``optimizer``'s step pre-hook (final gradients): record ``w_t`` and ``g_t``.

        ``scaler``: the enabled GradScaler of the run, if any (a fused optimizer's gradients are
        still scaled in the pre-hook); ``found_inf``: the flag it passed to a fused step (that
        step then moves nothing and is reported as skipped).
        """
        key = id(optimizer)
        measurer = self._measurers.get(key)
        if measurer is None:
            return  # no tracked tensors in it
        scale = _scale_tensor(scaler)
        grad_scale = scale if scale is not None and handles_unscaling(optimizer) and not _unscaled(scaler, optimizer) else None
        unit_grad = samples_unit_grad(log_step, every, self.unit_grad_every)
        per_unit = samples_unit_grad(log_step + 1, every, self.channel_every)
        slices = measurer.before_step(optimizer, grad_scale=grad_scale, unit_grad=unit_grad, per_unit=per_unit)
        self._in_flight[key] = (log_step, step, [theory.from_param_group(s.optimizer, s.group) for s in slices],
                                found_inf.reshape(-1)[:1] > 0 if isinstance(found_inf, Tensor) else None)

    def finish(self, optimizer: torch.optim.Optimizer) -> None:
        """In ``optimizer``'s step post-hook: the after-step sums, reduced across shards (a
        collective where sharded), combined on the device; kept until :meth:`pop_finished`."""
        key = id(optimizer)
        begun = self._in_flight.pop(key, None)
        if begun is None:
            return
        log_step, step, theories, skipped = begun
        stats, active = self._measurers[key].after_step()
        self._finished.append((key, Finished(log_step, step, stats, active, theories, skipped)))

    def pop_finished(self) -> list[Finished]:
        """The steps measured since the last call, in rounds: round ``k`` joins the ``k``-th
        measured step of every optimizer (one record for a GAN's two optimizers stepping once
        each; two records for one optimizer stepping twice)."""
        rounds: list[list[Finished]] = []
        seen: dict[int, int] = {}
        for key, finished in self._finished:
            k = seen.get(key, 0)
            seen[key] = k + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(finished)
        self._finished = []
        return [_join(r) for r in rounds]


def _join(parts: list[Finished]) -> Finished:
    """Several optimizers' measured steps as one: all tensor columns, then all unit columns."""
    if len(parts) == 1:
        return parts[0]
    slices = [s for p in parts for s in p.slices]
    stats = [p.stats for p in parts]
    if any(s.units is not None for s in slices):
        n_tensors = [sum(len(s.params) for s in p.slices) for p in parts]
        stats = [t[:, :k] for t, k in zip(stats, n_tensors)] + [t[:, k:] for t, k in zip(stats, n_tensors)]
    flags = [p.skipped for p in parts if p.skipped is not None]
    skipped = torch.stack(flags).any().reshape(1) if flags else None
    return Finished(parts[0].log_step, max(p.step for p in parts), torch.cat(stats, dim=1), slices,
                    [t for p in parts for t in p.theories], skipped)


def samples_unit_grad(log_step: int, every: int, min_gap: int) -> bool:
    """Whether measured step ``log_step`` (one in ``every``) also samples the unit gradient.

    The first measured step of each block of ``min_gap`` steps does: every measured step when
    ``every >= min_gap``, one in ``ceil(min_gap / every)`` otherwise. Stateless on purpose.
    """
    return log_step // min_gap != (log_step - every) // min_gap


def found_inf_of(optimizer: torch.optim.Optimizer, kwargs: dict[str, Any]) -> Tensor | None:
    """The inf/NaN flag a GradScaler hands a fused optimizer's step (``optimizer.found_inf`` in
    torch ≥ 2.1, a ``found_inf`` keyword before): that step runs, its hooks too, but moves nothing."""
    found_inf = kwargs.get("found_inf", getattr(optimizer, "found_inf", None))
    return found_inf if isinstance(found_inf, Tensor) else None


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
