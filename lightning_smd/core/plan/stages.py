"""The pure core of the plan: LR stages of each param group and their equilibrium timing, from numbers."""

from __future__ import annotations

import csv
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from lightning_smd.core import theory
from lightning_smd.core.theory import GroupTheory


DEFAULT_MIN_DROP = 2.0
DEFAULT_MIN_STAGE_FRACTION = 0.01
FIRST_STAGE_TIME_CONSTANTS = 3.0
_RELAXING = ("sgd", "sgdm", "nesterov", "adamw", "lion", "muon")  # families with a relaxation time / Corollary 3.1
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
    warmup_steps: int | None = None,
) -> list[tuple[int, int]]:
    """Cut one param group's schedule into stages (rules 1–4 of the module docstring).

    ``warmup_steps`` (the adapters' ``warmup_steps=`` option): ``None``, rule 4 recognizes the warm-up;
    N: the stages starting at steps ≤ N join the first one; ``0``: no warm-up.

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
    while (warmup_steps is None and lead + 1 < len(raw) and kind[raw[lead]] and kind[raw[lead + 1]] == kind[raw[lead]]
           and cut[raw[lead + 1]] > cut[raw[lead]]):
        lead += 1
    while warmup_steps and lead + 1 < len(raw) and int(schedule.steps[raw[lead + 1]]) <= warmup_steps:
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
        return values.settling_steps(time_constants), "init", ""
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
    warmup_steps: int | None = None,
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
        for index, (a, b) in enumerate(split_stages(schedule, end_step, min_drop, min_steps, warmup_steps)):
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


def _tau_text(values: GroupTheory) -> str:
    return "1/(2ηλ)" if values.decoupled else "(1−α)/(4λη)"


def _factor_text(short: Mapping[str, Sequence[Stage]]) -> str:
    """The drop factor of the families involved: k^(-1/4) (SGD/SGDM/Nesterov), k^(-1/2) (AdamW/Lion/Muon)."""
    exponents = sorted({e for stages in short.values() for st in stages
                        if (e := st.theory.norm_exponent) is not None}) or [0.25]
    texts = {0.25: "k^(-1/4) (SGD/SGDM/Nesterov)", 0.5: "k^(-1/2) (AdamW/Lion/Muon)"}
    if len(exponents) == 1:
        return f"k^(-1/{round(1 / exponents[0])})"
    return " or ".join(texts[e] for e in exponents)


def _advise(plan: Plan, min_drop: float, time_constants: float) -> None:
    """Fill ``plan.warnings`` / ``plan.recommendations`` from the stages (pure text)."""
    spe = plan.steps_per_epoch
    # one line per reason, naming its groups (a resnet's no-decay 'norm' and 'bias' groups share one)
    no_formula: dict[str, list[Stage]] = {}
    for stage in plan.stages:
        if not stage.theory.has_formula:
            no_formula.setdefault(stage.theory.reason or "", []).append(stage)
    for reason, stages in no_formula.items():
        groups = list(dict.fromkeys(s.group for s in stages))
        where = (f"param group {groups[0]!r}, {stages[0].describe(spe)}" if len(stages) == 1
                 else "param group" + ("s " + ", ".join(map(repr, groups)) if len(groups) > 1 else f" {groups[0]!r}"))
        plan.warnings.append(f"{where}: no equilibrium formula ({reason}); the plan lists "
                             f"{'the stage' if len(stages) == 1 else 'their stages'} without SMD numbers.")
    short: dict[str, list[Stage]] = {}
    for stage in plan.stages:
        values = stage.theory
        if stage.long_enough is not False:
            continue
        if stage.index == 0:
            tau = stage.relaxation_steps
            plan.warnings.append(
                f"param group {stage.group!r}: the first stage, {stage.describe(spe)}, lasts {stage.steps} steps, "
                f"fewer than the ~{stage.needed_steps} the weight norms need to settle from their initial values "
                f"({_num(time_constants)} relaxation times {_tau_text(values)} = {_num(time_constants)} × {_num(tau)} steps): "
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
                          f"multiplied by {_factor_text(short)}, so these stages start at their equilibrium.")
        return
    if continuous:
        setting = 'rescale="continuous" (Hydra: smd.rescale=continuous)'
        why = "the rate varies inside a too-short stage, and the continuous mode rescales at every change"
    else:
        setting = "rescale=True (Hydra: smd.rescale=true)"
        why = (f"the rescale multiplies the scale-invariant weights by {_factor_text(short)} at the drop, so the "
               "new equilibrium holds at once")
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

    def format(self, legend: bool = True) -> str:
        """The printed plan: a title, the table, a line explaining every column (``legend``; else
        a pointer to it), then the advice."""
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
                   _change_text(s.change) or "—", _num(v.weight_decay),
                   _num(v.momentum) if v.family in ("sgdm", "nesterov", "muon") else ("0" if v.family == "sgd" else "—"), _num(s.angular_update), _num(s.relaxation_steps), needed,
                   enough]
            table.append(row)
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
        legend_text = (
            "columns: steps = optimizer steps [start, end)"
            + ("; epochs = the same in epochs" if spe else "")
            + "; length = end − start; lr = η (first→last where it varies inside the stage); change = how the "
            "equilibrium moves from the previous stage, k = (η·λ')/(η'·λ) (÷k: a drop, ×: a rise); wd = λ; "
            "mom = α; Δ* = equilibrium angular update per step, sqrt(2λη/(1+α)) (SGD sqrt(2λη), AdamW "
            "sqrt(2ηλ(1−β1)/(1+β1)), Nesterov, Lion, Muon: docs/optimizer_theory.md); τ = relaxation time "
            "(1−α)/(4λη) steps (SGD 1/(4λη); AdamW/Lion/Muon 1/(2ηλ)); needed = steps to "
            "reach the stage's equilibrium: Corollary 3.1 ⌈|ln k|·(1−α)/(4λη')⌉ (AdamW/Lion/Muon "
            "⌈|ln k|/(2λ'η')⌉) after a change, (init) = "
            f"{_num(FIRST_STAGE_TIME_CONSTANTS)}τ from the initial weights; enough = length ≥ needed "
            "(? = unpredictable schedule)")
        if not legend:
            legend_text = "columns: τ = relaxation time (1−α)/(4λη); needed = steps to the stage's equilibrium " \
                          "(all columns: docs/plan.md, verbose=2)"
        advice = ([legend_text] + [f"warning: {w}" for w in self.warnings]
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
