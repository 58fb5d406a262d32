"""The plan from a Trainer: step copies of its schedulers as the fit loop will, without touching the real ones."""

from __future__ import annotations

import copy
import functools
import heapq
import itertools
import math
import time
import types
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence


from lightning_smd.core.loop import FitHorizon
from lightning_smd.core.plan.stages import (
    DEFAULT_MIN_DROP,
    DEFAULT_MIN_STAGE_FRACTION,
    FIRST_STAGE_TIME_CONSTANTS,
    GroupSchedule,
    Plan,
    build_plan,
)


# ------------------------------------------------------------------------- Lightning stepping
def scheduler_ticks(
    interval: str,
    frequency: int,
    batches_per_epoch: float,
    accumulate_grad_batches: int,
    end_step: int,
    start_step: int = 0,
) -> Iterator[int]:
    """The optimizer steps (0-based) after which Lightning's fit loop steps a scheduler.

    Mirrors ``pytorch_lightning.loops.training_epoch_loop``: an epoch of ``batches_per_epoch``
    batches makes ``ceil(batches / accumulate)`` optimizer steps, the last one on the final batch;
    an ``interval="step"`` scheduler steps after an optimizer step whose batch index ``b`` (in the
    epoch) has ``(b + 1) % frequency == 0``, so ``frequency`` counts batches, as in Lightning; an
    ``interval="epoch"`` scheduler steps after the epoch's last optimizer step when
    ``(epoch + 1) % frequency == 0``. Only ticks that change a planned step are yielded: after steps
    ``start_step … end_step − 2``. ``batches_per_epoch = inf`` (iterable data without a length):
    one endless epoch, epoch-interval schedulers never step.
    """
    if interval not in ("step", "epoch"):
        raise ValueError(f"scheduler interval must be 'step' or 'epoch', got {interval!r}")
    if not (isinstance(frequency, int) and frequency >= 1):
        raise ValueError(f"scheduler frequency must be an int >= 1, got {frequency!r}")
    accumulate = max(int(accumulate_grad_batches), 1)
    last = end_step - 1
    if not math.isfinite(batches_per_epoch):
        if interval == "step":
            yield from (j for j in range(start_step, last) if ((j + 1) * accumulate) % frequency == 0)
        return
    batches = int(batches_per_epoch)
    if batches <= 0:
        return
    per_epoch = math.ceil(batches / accumulate)
    first_epoch = start_step // per_epoch
    if interval == "epoch":
        for epoch in itertools.count(first_epoch):
            pos = epoch * per_epoch + per_epoch - 1
            if pos >= last:
                return
            if pos >= start_step and (epoch + 1) % frequency == 0:
                yield pos
    pattern = [j for j in range(per_epoch) if min((j + 1) * accumulate, batches) % frequency == 0]
    if not pattern:
        return
    if len(pattern) == per_epoch:  # every optimizer step ticks (frequency 1, or accumulation-aligned)
        yield from range(start_step, max(last, start_step))
        return
    for epoch in itertools.count(first_epoch):
        base = epoch * per_epoch
        if base >= last:
            return
        for j in pattern:
            pos = base + j
            if pos >= last:
                return
            if pos >= start_step:
                yield pos


class _ShadowOptimizer:
    """Stands in for an optimizer while copies of its schedulers are stepped.

    Holds copies of the param groups' hyper-parameters; ``params`` keep the same tensor objects
    (never read or written by schedulers, and not copied: a ResNet-50 costs nothing). No state, no
    hooks. ``step`` is marked the way torch's schedulers mark a wrapped ``optimizer.step`` so that
    stepping the schedulers does not warn about the call order.
    """

    def __init__(self, optimizer: Any) -> None:
        self.param_groups = [{k: (list(v) if k == "params" else copy.deepcopy(v)) for k, v in g.items()}
                             for g in optimizer.param_groups]
        self.defaults = copy.deepcopy(dict(getattr(optimizer, "defaults", {}) or {}))
        self.state: dict[Any, Any] = {}
        self._opt_called = True
        self.original_type = type(optimizer)

    def step(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("lightning_smd.core.plan never steps an optimizer")

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        pass


def _walk(scheduler: Any) -> Iterator[Any]:
    yield scheduler
    for sub in getattr(scheduler, "_schedulers", None) or []:
        yield from _walk(sub)


_SHARED_CALLABLES = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)


def _copy_schedulers(schedulers: Sequence[Any], shadows: Mapping[int, _ShadowOptimizer], originals: Sequence[Any],
                     keep: Iterable[Any]) -> tuple[list[Any], list[str]]:
    """Deep copies of ``schedulers`` whose ``optimizer`` is the shadow of their real optimizer.

    The memo maps each real optimizer (and its param-group list and dicts) to its shadow, every
    parameter and every object in ``keep`` (trainer, LightningModule) to itself. ``lr_lambdas``
    (LambdaLR, MultiplicativeLR) are not copied when they are functions, bound methods or
    partials: a bound method of the LightningModule would otherwise copy the whole module, and
    some callables cannot be copied at all. They are called, never changed, by the schedulers.
    Callable objects are deep-copied when they can be (they may keep state), else shared.
    """
    memo: dict[int, Any] = {}
    notes: list[str] = []
    for opt in originals:
        shadow = shadows[id(opt)]
        memo[id(opt)] = shadow
        memo[id(opt.param_groups)] = shadow.param_groups
        for real, copied in zip(opt.param_groups, shadow.param_groups):
            memo[id(real)] = copied
            for p in real.get("params", []):
                memo[id(p)] = p
    for obj in keep:
        if obj is not None:
            memo[id(obj)] = obj
    for scheduler in schedulers:
        for sub in _walk(scheduler):
            for fn in getattr(sub, "lr_lambdas", None) or []:
                if id(fn) in memo:
                    continue
                if isinstance(fn, _SHARED_CALLABLES):
                    memo[id(fn)] = fn
                    continue
                try:
                    memo[id(fn)] = copy.deepcopy(fn, memo)
                except Exception as err:  # noqa: BLE001 - any failure means: share it
                    memo[id(fn)] = fn
                    notes.append(f"{type(sub).__name__}: lr_lambda {type(fn).__name__} could not be copied ({err}); "
                                 "the plan called the original (its state, if any, has advanced).")
    return copy.deepcopy(list(schedulers), memo), notes


def _stepper(scheduler: Any) -> Callable[[], bool]:
    """A function that steps ``scheduler`` exactly as ``scheduler.step()`` and returns whether the
    hyper-parameters may have changed. Fast paths for exact torch classes (not subclasses):
    LambdaLR evaluates its lambdas directly (what its ``step()`` computes, without the bookkeeping);
    MultiStepLR, StepLR and ConstantLR only advance their counter between the epochs where their
    ``get_lr`` changes the rate. Any scheduler that keeps ``LRScheduler.step`` (cosine, OneCycle,
    linear, exponential, polynomial, cyclic, custom ``get_lr``) runs that method's body without its
    warnings. Overridden ``step()`` (SequentialLR, ChainedScheduler, warm restarts) and tensor
    rates call ``step()``."""
    from torch.optim import lr_scheduler as lrs

    kind = type(scheduler)
    groups = scheduler.optimizer.param_groups

    def plain_floats() -> bool:
        return all(type(g["lr"]) is float for g in groups) and all(type(b) is float for b in scheduler.base_lrs)

    if kind is lrs.LambdaLR and plain_floats():
        pairs = list(zip(groups, scheduler.lr_lambdas, scheduler.base_lrs, strict=True))
        if len(pairs) == 1:
            group, fn, base = pairs[0]

            def step_lambda() -> bool:
                scheduler.last_epoch += 1
                group["lr"] = base * fn(scheduler.last_epoch)
                return True
        else:
            def step_lambda() -> bool:
                scheduler.last_epoch += 1
                epoch = scheduler.last_epoch
                for group, fn, base in pairs:
                    group["lr"] = base * fn(epoch)
                return True

        # the copy is thrown away after planning: _step_count / _last_lr bookkeeping is skipped
        return step_lambda

    if kind in (lrs.MultiStepLR, lrs.StepLR, lrs.ConstantLR):
        def changes_at(epoch: int) -> bool:
            if kind is lrs.MultiStepLR:
                return epoch in scheduler.milestones
            if kind is lrs.StepLR:
                return epoch == 0 or epoch % scheduler.step_size == 0
            return epoch in (0, scheduler.total_iters)

        def step_sparse() -> bool:
            if changes_at(scheduler.last_epoch + 1):
                scheduler.step()
                return True
            scheduler._step_count += 1
            scheduler.last_epoch += 1
            return False

        return step_sparse

    if getattr(kind, "step", None) is lrs.LRScheduler.step and plain_floats():
        # LRScheduler.step() minus its call-order warnings and context manager: same get_lr(), same
        # counters, same writes (the copy's get_lr may run "within step" for good)
        scheduler._get_lr_called_within_step = True

        def step_base() -> bool:
            scheduler._step_count += 1
            scheduler.last_epoch += 1
            values = scheduler.get_lr()
            for group, value in zip(groups, values, strict=True):
                group["lr"] = value
            scheduler._last_lr = [g["lr"] for g in groups]
            return True

        return step_base

    def step_generic() -> bool:
        scheduler.step()
        return True

    return step_generic


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
        return float(value.item())
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _fingerprint(optimizers: Sequence[Any], schedulers: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for opt in optimizers:
        out.append([{k: _plain(v) for k, v in g.items() if k != "params"} for g in opt.param_groups])
    for s in schedulers:
        out.append((getattr(s, "last_epoch", None), getattr(s, "_step_count", None),
                    _plain(getattr(s, "_last_lr", None)), _plain(getattr(s, "best", None))))
    return out


def group_label(optimizers: Sequence[Any], optimizer_index: int, group_index: int) -> str:
    """The param group's name as ``SMDCallback`` logs it: ``group["name"]`` or ``pg{i}``, prefixed by
    ``opt{j}_`` when there are several optimizers."""
    group = optimizers[optimizer_index].param_groups[group_index]
    label = str(group["name"]) if "name" in group else f"pg{group_index}"
    return f"opt{optimizer_index}_{label}" if len(optimizers) > 1 else label


def plan_from_trainer(
    trainer: Any,
    *,
    rescale: bool | str = False,
    min_drop: float = DEFAULT_MIN_DROP,
    min_stage_fraction: float = DEFAULT_MIN_STAGE_FRACTION,
    first_stage_time_constants: float = FIRST_STAGE_TIME_CONSTANTS,
    batches_per_epoch: float | None = None,
    warmup_steps: int | None = None,
) -> Plan:
    """Predict the LR stages of ``trainer``'s fit from its optimizers and ``lr_scheduler_configs``.

    Call it once the optimizers exist and the train dataloader is set up: ``on_train_start`` (in
    ``on_fit_start`` ``num_training_batches`` is not known yet; only ``max_steps`` can be planned).
    It runs no collective, so rank 0 alone may call it. Plans optimizer steps ``trainer.global_step`` (after a resume, where the restored
    schedulers are) to ``max_steps`` or ``max_epochs × ceil(num_training_batches /
    accumulate_grad_batches)``, whichever comes first, and steps copies of the schedulers as the fit
    loop will (:func:`scheduler_ticks`: interval, frequency, accumulation). ReduceLROnPlateau, manual
    optimization and schedulers that cannot be copied are reported as unpredictable (their stages
    assume the LR does not change); nothing raises for them.

    Args:
        rescale: the callback's ``rescale`` setting (for the recommendations).
        min_drop: stage threshold on the equilibrium ratio; pass the ``RescalePolicy.min_drop`` in use.
        min_stage_fraction, first_stage_time_constants: see :func:`build_plan`.
        batches_per_epoch: override ``trainer.num_training_batches`` (e.g. a known dataset size).
        warmup_steps: the callback's ``warmup_steps`` (:func:`split_stages`).
    """
    module = getattr(trainer, "lightning_module", None)
    max_steps = getattr(trainer, "max_steps", -1)
    horizon = FitHorizon(
        schedulers=list(getattr(trainer, "lr_scheduler_configs", []) or []),
        max_steps=-1 if max_steps is None else int(max_steps),
        max_epochs=getattr(trainer, "max_epochs", None),
        batches_per_epoch=_batches_per_epoch(trainer) if batches_per_epoch is None else batches_per_epoch,
        accumulate_grad_batches=max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1),
        automatic_optimization=bool(getattr(module, "automatic_optimization", True)),
        keep=(trainer, module),
    )
    return plan_fit(list(getattr(trainer, "optimizers", []) or []), horizon, int(getattr(trainer, "global_step", 0) or 0),
                    rescale=rescale, min_drop=min_drop, min_stage_fraction=min_stage_fraction,
                    first_stage_time_constants=first_stage_time_constants, warmup_steps=warmup_steps)


def plan_fit(
    optimizers: Sequence[Any],
    horizon: FitHorizon,
    start: int = 0,
    *,
    rescale: bool | str = False,
    min_drop: float = DEFAULT_MIN_DROP,
    min_stage_fraction: float = DEFAULT_MIN_STAGE_FRACTION,
    first_stage_time_constants: float = FIRST_STAGE_TIME_CONSTANTS,
    warmup_steps: int | None = None,
) -> Plan:
    """:func:`plan_from_trainer` from plain values: the optimizers, the schedulers and the run's length
    (a :class:`~lightning_smd.core.loop.FitHorizon`), planned from optimizer step ``start``."""
    started = time.perf_counter()
    optimizers = list(optimizers)
    configs = list(horizon.schedulers)
    extra_warnings: list[str] = []
    notes: list[str] = []

    accumulate = max(int(horizon.accumulate_grad_batches or 1), 1)
    max_steps = horizon.max_steps
    max_epochs = horizon.max_epochs
    batches_per_epoch = horizon.batches_per_epoch
    per_epoch = math.ceil(batches_per_epoch / accumulate) if math.isfinite(batches_per_epoch) else None
    ends = [max_steps] if max_steps >= 0 else []
    if max_epochs not in (None, -1) and per_epoch:
        ends.append(per_epoch * int(max_epochs))
    if not ends:
        end = start
        extra_warnings.append(
            "cannot plan: no max_steps and no finite max_epochs × batches per epoch (call plan_from_trainer from "
            "on_train_start, once the train dataloader is set up, or set Trainer(max_steps=...) for data "
            "without a length).")
    else:
        end = min(ends)
    if start:
        notes.append(f"resumed: planning from optimizer step {start} with the restored scheduler state.")

    automatic = horizon.automatic_optimization
    by_optimizer: dict[int, list[tuple[int, Any]]] = {}
    unpredictable_opt: dict[int, str] = {}
    for ci, config in enumerate(configs):
        scheduler = config.scheduler
        opt = getattr(scheduler, "optimizer", None)
        oi = next((i for i, o in enumerate(optimizers) if o is opt), None)
        name = type(scheduler).__name__
        if oi is None:
            extra_warnings.append(f"scheduler {ci} ({name}) is bound to an optimizer the Trainer does not hold; skipped.")
            continue
        if not automatic:
            unpredictable_opt.setdefault(oi, "manual optimization: the LightningModule steps its schedulers itself, "
                                             "when is not known before training.")
            continue
        if getattr(config, "reduce_on_plateau", False) or name == "ReduceLROnPlateau":
            unpredictable_opt[oi] = (
                f"{name} (monitor {getattr(config, 'monitor', None)!r}) lowers the LR when the metric stops improving, "
                "which cannot be known before training: the stages after its first reduction are not in the plan. "
                "rescale=True handles its drops when they happen.")
            continue
        by_optimizer.setdefault(oi, []).append((ci, config))

    fingerprint = _fingerprint(optimizers, [c.scheduler for c in configs])
    shadows = {id(o): _ShadowOptimizer(o) for o in optimizers}
    schedules: list[GroupSchedule] = []
    unpredictable: dict[str, str] = {}
    for oi, opt in enumerate(optimizers):
        shadow = shadows[id(opt)]
        labels = [group_label(optimizers, oi, gi) for gi in range(len(opt.param_groups))]
        recorders = [_Recorder(start, g) for g in shadow.param_groups]
        entries = by_optimizer.get(oi, [])
        if entries and end > start:
            try:
                copies, copy_notes = _copy_schedulers([c.scheduler for _, c in entries], shadows, optimizers,
                                                      list(horizon.keep))
                notes.extend(copy_notes)
                if any(c.optimizer is not shadow for c in copies):
                    raise RuntimeError("a copied scheduler is not bound to the copied optimizer")
                _simulate(shadow, entries, copies, recorders, batches_per_epoch, accumulate, start, end)
            except Exception as err:  # noqa: BLE001 - the plan must never stop a fit
                unpredictable_opt[oi] = (f"its schedulers could not be copied and stepped ({type(err).__name__}: {err}); "
                                         "the plan shows the current rates only.")
                recorders = [_Recorder(start, g) for g in opt.param_groups]
        for gi, label in enumerate(labels):
            schedules.append(recorders[gi].schedule(label, opt, opt.param_groups[gi]))
            if oi in unpredictable_opt:
                unpredictable[label] = f"optimizer {oi} ({type(opt).__name__}): {unpredictable_opt[oi]}"

    after = _fingerprint(optimizers, [c.scheduler for c in configs])
    if after != fingerprint:  # pragma: no cover - would be a bug here
        extra_warnings.append("planning changed a real optimizer or scheduler (a bug in lightning_smd.core.plan); "
                              "please report it with your scheduler configuration.")

    plan = build_plan(schedules, end, start, min_drop=min_drop, min_stage_fraction=min_stage_fraction,
                      first_stage_time_constants=first_stage_time_constants, steps_per_epoch=per_epoch,
                      rescale=rescale, unpredictable=unpredictable, warnings=extra_warnings, notes=notes,
                      warmup_steps=warmup_steps)
    plan.elapsed_s = time.perf_counter() - started
    return plan


def _batches_per_epoch(trainer: Any) -> float:
    # Not set up before the fit loop starts (on_fit_start): setting the dataloader up from here would
    # run Lightning's barrier, a collective, which a rank-0-only call would never complete.
    batches = getattr(trainer, "num_training_batches", float("inf"))
    try:
        return float(batches)
    except (TypeError, ValueError):
        return float("inf")


class _Recorder:
    """Change points of one shadow param group: a new point when η, λ or α/β1 differs."""

    def __init__(self, start: int, group: Mapping[str, Any]) -> None:
        self.steps: list[int] = []
        self.lr: list[float] = []
        self.weight_decay: list[float] = []
        self.momentum: list[float | None] = []
        self._lr, self._wd, self._mom = _values(group)
        self._add(start, (self._lr, self._wd, self._mom))

    def _add(self, step: int, values: tuple[float, float, float | None]) -> None:
        if self.steps and self.steps[-1] == step:  # two schedulers ticked after the same step
            self.lr[-1], self.weight_decay[-1], self.momentum[-1] = values
            return
        self.steps.append(step)
        self.lr.append(values[0])
        self.weight_decay.append(values[1])
        self.momentum.append(values[2])

    def update(self, step: int, group: Mapping[str, Any]) -> None:
        # the stored values are floats, so a tensor rate filled in place still compares by value
        momentum = group.get("momentum")
        if momentum is None and "betas" in group:
            momentum = group["betas"][0]
        if group["lr"] == self._lr and group.get("weight_decay", 0.0) == self._wd and momentum == self._mom:
            return
        self._lr, self._wd, self._mom = values = _values(group)
        self._add(step, values)

    def schedule(self, label: str, optimizer: Any, group: Mapping[str, Any]) -> GroupSchedule:
        template = {k: v for k, v in group.items() if k not in ("params", "lr", "weight_decay")}
        return GroupSchedule(label, optimizer, template, self.steps, self.lr, self.weight_decay, self.momentum)


def _values(group: Mapping[str, Any]) -> tuple[float, float, float | None]:
    # float() also reads tensor-valued rates (capturable optimizers), which schedulers fill_ in place
    momentum = group.get("momentum")
    if momentum is None:
        betas = group.get("betas")
        momentum = None if betas is None else betas[0]
    return (float(group["lr"]), float(group.get("weight_decay", 0.0)),
            None if momentum is None else float(momentum))


def _tagged(ticks: Iterable[int], rank: int, order: int) -> Iterator[tuple[int, int, int]]:
    for pos in ticks:
        yield pos, rank, order


def _simulate(shadow: _ShadowOptimizer, entries: Sequence[tuple[int, Any]], copies: Sequence[Any],
              recorders: Sequence[_Recorder], batches_per_epoch: float, accumulate: int, start: int, end: int) -> None:
    """Step ``copies`` (bound to ``shadow``) at Lightning's ticks and record the changes."""
    streams = []
    steppers = []
    for order, ((_, config), copied) in enumerate(zip(entries, copies)):
        interval = getattr(config, "interval", "epoch")
        ticks = scheduler_ticks(interval, int(getattr(config, "frequency", 1) or 1), batches_per_epoch, accumulate,
                                end, start)
        rank = 0 if interval == "step" else 1  # the fit loop steps "step" schedulers before "epoch" ones
        streams.append(ticks if len(entries) == 1 else _tagged(ticks, rank, order))
        steppers.append(_stepper(copied))
    pairs = list(zip(shadow.param_groups, recorders))
    with warnings.catch_warnings():
        # SequentialLR steps its children with an explicit epoch, which torch flags as deprecated
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.optim\.lr_scheduler")
        if len(entries) == 1 and len(pairs) == 1:
            step, ((group, recorder),) = steppers[0], pairs
            update = recorder.update
            for pos in streams[0]:
                if step():
                    update(pos + 1, group)
            return
        if len(entries) == 1:
            step = steppers[0]
            for pos in streams[0]:
                if step():
                    for group, recorder in pairs:
                        recorder.update(pos + 1, group)
            return
        for pos, _, order in heapq.merge(*streams):
            if steppers[order]():
                for group, recorder in pairs:
                    recorder.update(pos + 1, group)
