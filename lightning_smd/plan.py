"""The plan of a fit: its learning-rate stages per param group and when each reaches equilibrium.

At fit start the schedule is known, so SMD can say in advance which LR stages are long enough for
the weight norms (and Δ_t) to reach the stage's equilibrium, and where ``rescale=True`` helps.

Two layers:

* a pure core, :func:`build_plan`: per param group a :class:`GroupSchedule` (η, λ, α at the optimizer
  steps where they change, plus the rest of the param group) → :class:`Plan`. Every number
  comes from :mod:`lightning_smd.theory`: Δ* (``GroupTheory.angular_update``), the relaxation time
  (1 − α)/(4λη) (``GroupTheory.relaxation_steps``), Corollary 3.1's steps to the new equilibrium
  (``GroupTheory.steps_to_equilibrium_from``), the equilibrium ratio k
  (:func:`~lightning_smd.theory.equilibrium_ratio`) and, for the first stage,
  :func:`~lightning_smd.theory.settling_steps`.
* a Lightning builder, :func:`plan_from_trainer`: steps copies of the configured schedulers, bound
  to stand-in optimizers that hold copies of the param groups only (no parameters, no state, no
  hooks are copied), exactly as Lightning's fit loop would step the real ones; the real optimizers
  and schedulers are never stepped (checked after planning).

How a schedule is cut into stages (:func:`split_stages`):

1. Steps with identical hyper-parameters form a *segment* (a MultiStep schedule has one segment per
   milestone, a per-step cosine one segment per step).
2. A new *stage* starts at the first segment whose equilibrium ratio k = (η·λ')/(η'·λ) against the
   stage's first segment reaches ``min_drop`` in either direction (default 2, the rescale policy's
   ``rescale_min_drop``: the changes the rescale reacts to), or where η or λ becomes 0 (no
   formula). A group without weight decay is cut on η alone. A piecewise-constant schedule gets one stage per value; a continuous one (cosine,
   OneCycle, polynomial) one stage per factor ``min_drop`` of ηλ.
3. A stage shorter than ``min_stage_fraction`` of the planned steps (default 1 %) absorbs the
   next one (a short final stage joins the previous one), so a cosine tail near η = 0 does not
   make dozens of stages.
4. A warm-up, stages at the start that only rise, joins the stage it ramps up to, whatever its
   length: the settling from the initialisation is judged on the stage that follows it.
5. Each stage is described by its *representative* values: the step-weighted median (by η/λ) of
   its values, among those with an equilibrium formula. For a piecewise-constant stage that is its
   value; for warm-up + plateau the plateau (when it is most of the stage); for a ramp its middle
   (within a factor ``min_drop`` of every value of the ramp, by rule 2). ``lr`` shows
   first→last where the rate varies inside the stage (``continuous``).

"Long enough": the stage lasts at least the steps its equilibrium needs. After a change that is
Corollary 3.1, ``⌈|ln k|·(1 − α)/(4λη')⌉`` from the previous stage's representative values. For the
first stage the distance from the initialisation is unknown before L is measured, so it needs
``first_stage_time_constants`` (default 3) relaxation times ``(1 − α)/(4λη)`` (the deviation shrinks
by e^(−3), 95 % of the way; :func:`~lightning_smd.theory.settling_steps`). AdamW and Lion have a Δ*
but no relaxation formula in the theory: their stages say so instead of guessing.

Cost: only changes are recorded, MultiStepLR/StepLR/ConstantLR skip the ticks where nothing
changes, LambdaLR calls its lambdas directly. Goyal's ImageNet schedule (90 epochs × 5004 steps,
epoch-interval MultiStepLR) plans in about a millisecond; the same at step interval (450 360
ticks) in about 0.3 s, COCO 4x (360 000 LambdaLR ticks with warm-up) in under 1 s; a per-step
``CosineAnnealingLR`` / ``OneCycleLR`` costs torch's ``get_lr`` per tick (≈ 3 s for 450 000 on a
busy 2-core CPU).
"""

from __future__ import annotations

import copy
import csv
import functools
import heapq
import itertools
import math
import textwrap
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from lightning_smd import theory
from lightning_smd.theory import GroupTheory

__all__ = [
    "DEFAULT_MIN_DROP",
    "DEFAULT_MIN_STAGE_FRACTION",
    "FIRST_STAGE_TIME_CONSTANTS",
    "GroupSchedule",
    "Plan",
    "Stage",
    "build_plan",
    "plan_from_trainer",
    "scheduler_ticks",
    "split_stages",
]

DEFAULT_MIN_DROP = 2.0
DEFAULT_MIN_STAGE_FRACTION = 0.01
FIRST_STAGE_TIME_CONSTANTS = 3.0
_RELAXING = ("sgd", "sgdm")  # families with a relaxation time / Corollary 3.1 in the theory
_LISTED = 3  # too-short stages spelled out per group in a recommendation
_WIDTH = 110  # Plan.format() wraps its text paragraphs at this width


# ------------------------------------------------------------------------------------ pure core
@dataclass(frozen=True)
class GroupSchedule:
    """One param group's hyper-parameters over the planned steps, as change points.

    ``lr[i]``, ``weight_decay[i]`` and ``momentum[i]`` (SGD's ``momentum``, or β1 of ``betas``;
    ``None`` when the group has neither) hold from optimizer step ``steps[i]`` until
    ``steps[i + 1]`` (the last until the plan's end). ``group`` is the rest of the param group
    (``nesterov``, ``dampening``, ``betas``, …) and ``optimizer`` is only used for its class, to
    recognise the family (:func:`lightning_smd.theory.from_param_group`).
    """

    label: str
    optimizer: Any
    group: Mapping[str, Any]
    steps: Sequence[int]
    lr: Sequence[float]
    weight_decay: Sequence[float]
    momentum: Sequence[float | None]

    def __post_init__(self) -> None:
        n = len(self.steps)
        if not n or len(self.lr) != n or len(self.weight_decay) != n or len(self.momentum) != n:
            raise ValueError(f"param group {self.label!r}: steps, lr, weight_decay and momentum must have the same, "
                             f"non-zero length (got {n}, {len(self.lr)}, {len(self.weight_decay)}, {len(self.momentum)})")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError(f"param group {self.label!r}: change steps must increase")

    @classmethod
    def from_sequence(cls, label: str, optimizer: Any, group: Mapping[str, Any], lr: Sequence[float],
                      weight_decay: Sequence[float] | float, momentum: Sequence[float | None] | float | None = None,
                      start: int = 0) -> GroupSchedule:
        """From one value per optimizer step (``start``, ``start + 1``, …); repeats are compressed."""
        n = len(lr)
        wds = [weight_decay] * n if isinstance(weight_decay, (int, float)) else list(weight_decay)
        moms = list(momentum) if isinstance(momentum, Sequence) else [momentum] * n
        keep = [i for i in range(n) if i == 0 or (lr[i], wds[i], moms[i]) != (lr[i - 1], wds[i - 1], moms[i - 1])]
        return cls(label, optimizer, group, [start + i for i in keep], [float(lr[i]) for i in keep],
                   [float(wds[i]) for i in keep], [moms[i] for i in keep])

    def values_per_step(self, end: int) -> list[tuple[float, float, float | None]]:
        """``(lr, weight_decay, momentum)`` of every optimizer step ``steps[0] … end − 1`` (expanded)."""
        out: list[tuple[float, float, float | None]] = []
        bounds = list(self.steps[1:]) + [end]
        for i, stop in enumerate(bounds):
            out.extend([(self.lr[i], self.weight_decay[i], self.momentum[i])] * max(0, min(stop, end) - self.steps[i]))
        return out

    def theory_at(self, i: int) -> GroupTheory:
        """The SMD formulas of the values that start at ``steps[i]``."""
        group = {k: v for k, v in self.group.items() if k != "params"}
        group["lr"], group["weight_decay"] = self.lr[i], self.weight_decay[i]
        momentum = self.momentum[i]
        if momentum is not None:
            if "betas" in group:
                group["betas"] = (momentum, *tuple(group["betas"])[1:])
            else:
                group["momentum"] = momentum
        return theory.from_param_group(self.optimizer, group)


@dataclass(frozen=True)
class Stage:
    """One LR stage of one param group: optimizer steps ``[start, end)`` and its SMD numbers.

    ``theory`` holds the stage's representative values (see the module docstring). ``change`` is
    the equilibrium ratio k against the previous stage (k > 1: ‖w*‖⁴ divided by k, a drop), ``None``
    for the first stage. ``needed_steps`` is Corollary 3.1's count (``basis="corollary_3.1"``) or,
    for the first stage, the settling estimate (``basis="init"``); ``None`` where the theory has no
    relaxation formula (``note`` says why).
    """

    group: str
    index: int
    start: int
    end: int
    theory: GroupTheory
    lr_first: float
    lr_last: float
    lr_min: float
    lr_max: float
    change: float | None = None
    needed_steps: int | None = None
    basis: str = ""
    predictable: bool = True
    note: str = ""

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def continuous(self) -> bool:
        """The rate varies inside the stage (warm-up, cosine, OneCycle, merged short stages)."""
        return self.lr_min != self.lr_max

    @property
    def angular_update(self) -> float | None:
        """Δ* of the representative values, radians per step."""
        return self.theory.angular_update

    @property
    def relaxation_steps(self) -> float | None:
        """(1 − α)/(4λη) (SGD: 1/(4λη)) of the representative values, in steps."""
        return self.theory.relaxation_steps

    @property
    def long_enough(self) -> bool | None:
        """``steps >= needed_steps``; ``None`` without a relaxation formula."""
        return None if self.needed_steps is None else self.steps >= self.needed_steps

    def describe(self, steps_per_epoch: int | None = None) -> str:
        """``"stage 2 (steps 300000–340000, η 0.002)"`` for messages."""
        where = f"steps {self.start}–{self.end}"
        if steps_per_epoch:
            where += f", epochs {_num(self.start / steps_per_epoch)}–{_num(self.end / steps_per_epoch)}"
        return f"stage {self.index} ({where}, η {_lr_text(self)})"


def _arrays(schedule: GroupSchedule, end: int) -> tuple[Any, ...]:
    """Per change point before ``end``: durations, validity (η > 0 and λ > 0, finite), log(η/λ), η,
    and for cutting stages a kind (2: η, λ > 0; 1: η > 0 only, no decay; 0: η ≤ 0) with the log of
    the quantity compared within that kind (η/λ, η)."""
    import numpy as np

    steps = np.asarray(schedule.steps, dtype=np.int64)
    n = int(np.searchsorted(steps, end, side="left"))
    steps = steps[:n]
    lr = np.asarray(schedule.lr[:n], dtype=np.float64)
    wd = np.asarray(schedule.weight_decay[:n], dtype=np.float64)
    durations = np.diff(np.append(steps, end))
    with np.errstate(divide="ignore", invalid="ignore"):
        positive = (lr > 0) & np.isfinite(lr)
        valid = positive & (wd > 0) & np.isfinite(wd)
        log_lr = np.log(np.where(positive, lr, 1.0))
        q = np.where(valid, log_lr - np.log(np.where(valid, wd, 1.0)), 0.0)
    kind = np.where(valid, 2, np.where(positive, 1, 0))
    cut = np.where(valid, q, np.where(positive, log_lr, 0.0))
    return durations, valid, q, lr, kind, cut


def split_stages(
    schedule: GroupSchedule,
    end: int,
    min_drop: float = DEFAULT_MIN_DROP,
    min_stage_steps: int = 1,
) -> list[tuple[int, int]]:
    """Cut one param group's schedule into stages (rules 1–4 of the module docstring).

    Returns ``[a, b)`` ranges of change-point indices (``schedule.steps[a]`` starts the stage), for
    the change points before ``end``. Vectorised: a 450 000-point cosine takes milliseconds.
    """
    import numpy as np

    if not min_drop > 1:
        raise ValueError(f"min_drop must be > 1, got {min_drop!r}")
    durations, _, _, _, kind, cut = _arrays(schedule, end)
    n = len(durations)
    if n == 0:
        return []
    threshold = math.log(min_drop) * (1.0 - 1e-9)
    raw: list[int] = [0]
    i = 0
    while i < n:
        j, window, found = i + 1, 256, None
        while j < n and found is None:
            stop = min(n, j + window)
            breaks = kind[j:stop] != kind[i]
            if kind[i]:
                breaks |= np.abs(cut[j:stop] - cut[i]) >= threshold
            if breaks.any():
                found = j + int(np.argmax(breaks))
            j, window = stop, window * 2
        if found is None:
            break
        raw.append(found)
        i = found
    # rule 4: leading stages that only rise (a warm-up) join the first one that does not
    lead = 0
    while (lead + 1 < len(raw) and kind[raw[lead]] and kind[raw[lead + 1]] == kind[raw[lead]]
           and cut[raw[lead + 1]] > cut[raw[lead]]):
        lead += 1
    if lead:
        raw = [0] + raw[lead + 1:]
    bounds = list(zip(raw, raw[1:] + [n]))
    steps = [int(schedule.steps[a]) for a, _ in bounds] + [end]
    merged: list[list[int]] = []  # [a, b, start, stop]
    for (a, b), start, stop in zip(bounds, steps, steps[1:]):
        if merged and merged[-1][3] - merged[-1][2] < min_stage_steps:
            merged[-1][1], merged[-1][3] = b, stop
        else:
            merged.append([a, b, start, stop])
    if len(merged) > 1 and merged[-1][3] - merged[-1][2] < min_stage_steps:
        last = merged.pop()
        merged[-1][1], merged[-1][3] = last[1], last[3]
    return [(a, b) for a, b, _, _ in merged]


def _representative(durations: Any, valid: Any, q: Any, lr: Any) -> int:
    """Index of the step-weighted median change point (by η/λ; those with a formula, if any)."""
    import numpy as np

    index = np.flatnonzero(valid) if valid.any() else np.arange(len(durations))
    key = q[index] if valid.any() else lr[index]
    order = index[np.argsort(key, kind="stable")]
    weights = np.cumsum(durations[order])
    return int(order[int(np.searchsorted(weights, weights[-1] / 2.0, side="left"))])


def _needed(previous: GroupTheory | None, values: GroupTheory, time_constants: float) -> tuple[int | None, str, str]:
    if values.family not in _RELAXING:
        reason = values.reason or f"the theory has no relaxation time for {values.family}"
        return None, "", reason
    if previous is None or previous.family not in _RELAXING:
        return theory.settling_steps(values.effective_lr, values.weight_decay, values.momentum, time_constants), "init", ""
    return values.steps_to_equilibrium_from(previous), "corollary_3.1", ""


def build_plan(
    schedules: Sequence[GroupSchedule],
    end_step: int,
    start_step: int = 0,
    *,
    min_drop: float = DEFAULT_MIN_DROP,
    min_stage_fraction: float = DEFAULT_MIN_STAGE_FRACTION,
    first_stage_time_constants: float = FIRST_STAGE_TIME_CONSTANTS,
    steps_per_epoch: int | None = None,
    rescale: bool | str = False,
    unpredictable: Mapping[str, str] | None = None,
    warnings: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> Plan:
    """The plan of optimizer steps ``[start_step, end_step)`` from each group's schedule.

    Args:
        schedules: one :class:`GroupSchedule` per param group (its first change at ``start_step``).
        min_drop, min_stage_fraction: stage rules 2 and 3 (module docstring).
        first_stage_time_constants: relaxation times the first stage needs from the initialisation.
        steps_per_epoch: optimizer steps per epoch, to show epochs (``None``: steps only).
        rescale: the callback's ``rescale`` setting; the recommendations take it into account.
        unpredictable: group label → why its schedule cannot be predicted (ReduceLROnPlateau, …);
            its stages are the ones seen if that never changes the rate.
        warnings, notes: extra lines (from the builder) for :attr:`Plan.warnings` / :attr:`Plan.notes`.
    """
    import numpy as np

    if not 0 <= min_stage_fraction < 1:
        raise ValueError(f"min_stage_fraction must be in [0, 1), got {min_stage_fraction!r}")
    unpredictable = dict(unpredictable or {})
    planned = max(end_step - start_step, 0)
    min_steps = max(1, math.ceil(min_stage_fraction * planned))
    stages: list[Stage] = []
    for schedule in schedules:
        label = schedule.label
        if not planned:
            continue
        durations, valid, q, lr, _, _ = _arrays(schedule, end_step)
        previous: GroupTheory | None = None
        for index, (a, b) in enumerate(split_stages(schedule, end_step, min_drop, min_steps)):
            values = schedule.theory_at(_representative(durations[a:b], valid[a:b], q[a:b], lr[a:b]) + a)
            change = None
            if previous is not None and previous.has_formula and values.has_formula:
                change = theory.equilibrium_ratio(previous.effective_lr, values.effective_lr, previous.weight_decay,
                                                  values.weight_decay)
            needed, basis, note = _needed(previous, values, first_stage_time_constants)
            if label in unpredictable:
                note = "; ".join(filter(None, [note, "unpredictable: assumes the LR is never reduced"]))
            end = int(schedule.steps[b]) if b < len(durations) else end_step
            rates = lr[a:b]
            stages.append(Stage(label, index, int(schedule.steps[a]), end, values, float(rates[0]), float(rates[-1]),
                                float(rates.min()), float(rates.max()), change, needed, basis,
                                label not in unpredictable, note))
            previous = values
    plan = Plan(stages, start_step, end_step, steps_per_epoch, rescale, list(warnings), [], list(notes),
                schedules=list(schedules))
    plan.warnings.extend(f"param group {label!r}: {reason}" for label, reason in unpredictable.items())
    _advise(plan, min_drop, first_stage_time_constants)
    return plan


def _advise(plan: Plan, min_drop: float, time_constants: float) -> None:
    """Fill ``plan.warnings`` / ``plan.recommendations`` from the stages (pure text)."""
    spe = plan.steps_per_epoch
    seen_reason: set[tuple[str, str]] = set()
    short: dict[str, list[Stage]] = {}
    for stage in plan.stages:
        values = stage.theory
        if not values.has_formula and (stage.group, values.reason or "") not in seen_reason:
            seen_reason.add((stage.group, values.reason or ""))
            plan.warnings.append(f"param group {stage.group!r}, {stage.describe(spe)}: no equilibrium formula "
                                 f"({values.reason}); the plan lists the stage without SMD numbers.")
        if stage.long_enough is not False:
            continue
        if stage.index == 0:
            tau = stage.relaxation_steps
            plan.warnings.append(
                f"param group {stage.group!r}: the first stage, {stage.describe(spe)}, lasts {stage.steps} steps, "
                f"fewer than the ~{stage.needed_steps} the weight norms need to settle from their initial values "
                f"({_num(time_constants)} relaxation times (1−α)/(4λη) = {_num(time_constants)} × {_num(tau)} steps): "
                f"Δ_t will not reach Δ* = {_num(stage.angular_update)} rad before the LR changes. Make the first stage "
                "longer or λη larger; the rescale does not help here (it acts at LR changes).")
        else:
            short.setdefault(stage.group, []).append(stage)
    if not short:
        return
    continuous = any(s.continuous for stages in short.values() for s in stages)
    mode = "continuous" if continuous else True

    def listing(stages: list[Stage]) -> str:
        text = ", ".join(f"{s.describe(spe)}{_change_text(s.change, ' after ')} lasts {s.steps} steps but needs "
                         f"{s.needed_steps} (Corollary 3.1)" for s in stages[:_LISTED])
        return text + (f", and {len(stages) - _LISTED} more stage(s)" if len(stages) > _LISTED else "")

    details = "; ".join(f"param group {group!r}: {listing(stages)}" for group, stages in short.items())
    if plan.rescale and (plan.rescale == "continuous" or not continuous):
        when = ("at every LR change" if plan.rescale == "continuous"
                else f"at each LR change of at least ×{_num(min_drop)}")
        plan.notes.append(f"rescale={plan.rescale!r} is on: {details}; {when} the scale-invariant weights are "
                          "multiplied by k^(-1/4), so these stages start at their equilibrium.")
        return
    if continuous:
        setting = 'SMDCallback(rescale="continuous") (Hydra: smd.rescale=continuous)'
        why = "the rate varies inside a too-short stage, and the continuous mode rescales at every change"
    else:
        setting = "SMDCallback(rescale=True) (Hydra: smd.rescale=true)"
        why = ("the rescale multiplies the scale-invariant weights by k^(-1/4) at the drop, so the new "
               "equilibrium holds at once")
    plan.recommendations.append(f"Recommend {setting}: {details}. Without it Δ_t stays below Δ* in those "
                                f"stages; {why}.")
    plan.recommended_rescale = mode


@dataclass
class Plan:
    """The predicted LR stages of a fit (:func:`plan_from_trainer` or :func:`build_plan`).

    ``stages`` are ordered by group, then time. ``warnings`` (first stage too short, no formula,
    unpredictable schedulers) and ``recommendations`` (``rescale=True`` where a stage is too short)
    are complete sentences naming the param group. ``notes`` say how the plan was made.
    ``schedules`` keep every predicted change of η, λ, α per group (e.g. to plot the LR);
    ``recommended_rescale`` is the ``rescale`` value recommended (``True``, ``"continuous"``) or
    ``None``; ``elapsed_s`` is the planning time.
    """

    stages: list[Stage]
    start_step: int
    end_step: int
    steps_per_epoch: int | None = None
    rescale: bool | str = False
    warnings: list[str] = field(default_factory=list)
    recommendations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    recommended_rescale: bool | str | None = None
    schedules: list[GroupSchedule] = field(default_factory=list)

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(s.group for s in self.stages))

    def stages_of(self, group: str) -> list[Stage]:
        return [s for s in self.stages if s.group == group]

    @property
    def predictable(self) -> bool:
        return all(s.predictable for s in self.stages)

    @property
    def too_short(self) -> list[Stage]:
        """Stages shorter than the steps their equilibrium needs."""
        return [s for s in self.stages if s.long_enough is False]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per stage (same keys in every row), for a W&B table or a CSV file."""
        spe = self.steps_per_epoch
        out = []
        for s in self.stages:
            v = s.theory
            out.append({
                "group": s.group,
                "stage": s.index,
                "start_step": s.start,
                "end_step": s.end,
                "steps": s.steps,
                "start_epoch": None if not spe else s.start / spe,
                "end_epoch": None if not spe else s.end / spe,
                "lr": v.lr,
                "lr_first": s.lr_first,
                "lr_last": s.lr_last,
                "lr_min": s.lr_min,
                "lr_max": s.lr_max,
                "continuous": s.continuous,
                "weight_decay": v.weight_decay,
                "momentum": v.momentum,
                "family": v.family,
                "change_k": s.change,
                "angular_update_theory": s.angular_update,
                "relaxation_steps": s.relaxation_steps,
                "steps_to_equilibrium": s.needed_steps,
                "basis": s.basis,
                "long_enough": s.long_enough,
                "predictable": s.predictable,
                "note": s.note,
            })
        return out

    def write_csv(self, path: str | Path) -> Path:
        """Write :meth:`rows` to ``path`` (parents created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        columns = list(rows[0]) if rows else list(_EMPTY_ROW_KEYS)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
        return path

    def format(self) -> str:
        """The printed plan: a title, the table, a line explaining every column, then the advice."""
        spe = self.steps_per_epoch
        span = f"optimizer steps {self.start_step}–{self.end_step}"
        if spe:
            span += f" ({_num((self.end_step - self.start_step) / spe)} epochs × {spe} steps)"
        lines = [f"SMD plan: {span}, {len(self.stages)} LR stage(s), planned in {self.elapsed_s:.3f} s"]
        header = ["group", "stage", "steps", *(["epochs"] if spe else []), "length", "lr", "change", "wd",
                  "mom", "Δ* rad", "τ steps", "needed", "enough"]
        table = [header]
        for s in self.stages:
            v = s.theory
            needed = "—" if s.needed_steps is None else f"{s.needed_steps}{' (init)' if s.basis == 'init' else ''}"
            enough = {True: "yes", False: "NO", None: "—"}[s.long_enough] + ("" if s.predictable else "?")
            row = [s.group, str(s.index), f"{s.start}–{s.end}",
                   *([f"{_num(s.start / spe)}–{_num(s.end / spe)}"] if spe else []), str(s.steps), _lr_text(s),
                   _change_text(s.change) or "—", _num(v.weight_decay), _num(v.momentum) if v.family == "sgdm" else
                   ("0" if v.family == "sgd" else "—"), _num(s.angular_update), _num(s.relaxation_steps), needed,
                   enough]
            table.append(row)
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
        legend = (
            "columns: steps = optimizer steps [start, end)"
            + ("; epochs = the same in epochs" if spe else "")
            + "; length = end − start; lr = η (first→last where it varies inside the stage); change = how the "
            "equilibrium moves from the previous stage, k = (η·λ')/(η'·λ) (÷k: a drop, ×: a rise); wd = λ; "
            "mom = α; Δ* = equilibrium angular update per step, sqrt(2λη/(1+α)) (SGD sqrt(2λη), AdamW "
            "sqrt(2ηλ(1−β1)/(1+β1))); τ = relaxation time (1−α)/(4λη) steps (SGD 1/(4λη)); needed = steps to "
            "reach the stage's equilibrium: Corollary 3.1 ⌈|ln k|·(1−α)/(4λη')⌉ after a change, (init) = "
            f"{_num(FIRST_STAGE_TIME_CONSTANTS)}τ from the initial weights; enough = length ≥ needed "
            "(? = unpredictable schedule)")
        advice = ([legend] + [f"warning: {w}" for w in self.warnings]
                  + [f"recommendation: {r}" for r in self.recommendations] + [f"note: {n}" for n in self.notes])
        for paragraph in advice:
            lines += textwrap.wrap(paragraph, width=_WIDTH, initial_indent="  ", subsequent_indent="    ",
                                   break_long_words=False, break_on_hyphens=False)
        return "\n".join(lines)


_EMPTY_ROW_KEYS = ("group", "stage", "start_step", "end_step", "steps")


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    if x == 0:
        return "0"
    if 1000 <= abs(x) < 1e9:
        return f"{x:.0f}"
    if float(x).is_integer() and abs(x) < 1e9:
        return str(int(x))
    return f"{x:.4g}"


def _lr_text(stage: Stage) -> str:
    if not stage.continuous:
        return _num(stage.lr_first)
    text = f"{_num(stage.lr_first)}→{_num(stage.lr_last)}"
    if stage.lr_max not in (stage.lr_first, stage.lr_last):
        text += f" (max {_num(stage.lr_max)})"
    elif stage.lr_min not in (stage.lr_first, stage.lr_last):
        text += f" (min {_num(stage.lr_min)})"
    return text


def _change_text(k: float | None, prefix: str = "") -> str:
    if k is None or math.isclose(k, 1.0, rel_tol=1e-9):
        return ""
    return f"{prefix}÷{_num(k)}" if k > 1 else f"{prefix}×{_num(1 / k)}"


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
        raise RuntimeError("lightning_smd.plan never steps an optimizer")

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
        min_drop: stage threshold on the equilibrium ratio; pass the callback's ``rescale_min_drop``.
        min_stage_fraction, first_stage_time_constants: see :func:`build_plan`.
        batches_per_epoch: override ``trainer.num_training_batches`` (e.g. a known dataset size).
    """
    started = time.perf_counter()
    optimizers = list(getattr(trainer, "optimizers", []) or [])
    configs = list(getattr(trainer, "lr_scheduler_configs", []) or [])
    extra_warnings: list[str] = []
    notes: list[str] = []

    accumulate = max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)
    max_steps = getattr(trainer, "max_steps", -1)
    max_steps = -1 if max_steps is None else int(max_steps)
    max_epochs = getattr(trainer, "max_epochs", None)
    if batches_per_epoch is None:
        batches_per_epoch = _batches_per_epoch(trainer)
    per_epoch = math.ceil(batches_per_epoch / accumulate) if math.isfinite(batches_per_epoch) else None
    ends = [max_steps] if max_steps >= 0 else []
    if max_epochs not in (None, -1) and per_epoch:
        ends.append(per_epoch * int(max_epochs))
    start = int(getattr(trainer, "global_step", 0) or 0)
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

    module = getattr(trainer, "lightning_module", None)
    automatic = bool(getattr(module, "automatic_optimization", True))
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
                                                      [trainer, module])
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
        extra_warnings.append("planning changed a real optimizer or scheduler (a bug in lightning_smd.plan); "
                              "please report it with your scheduler configuration.")

    plan = build_plan(schedules, end, start, min_drop=min_drop, min_stage_fraction=min_stage_fraction,
                      first_stage_time_constants=first_stage_time_constants, steps_per_epoch=per_epoch,
                      rescale=rescale, unpredictable=unpredictable, warnings=extra_warnings, notes=notes)
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
