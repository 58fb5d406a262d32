"""The detection report printed once on rank 0, in the spirit of Lightning's ModelSummary.

Two forms of the same facts: a grouped one that fits a screen (rows per stage of the network and
kind of evidence, with tensor, parameter and invariance-unit counts: what ``verbose=True`` prints),
and the full per-tensor table (``verbose=2``, and the ``smd_tensors.txt`` file the callback writes).
No line is wider than :data:`MAX_WIDTH`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from lightning_smd.core.theory import GroupTheory

__all__ = ["MAX_WIDTH", "DetectionRow", "first_names", "format_detection_report"]

#: widest line the reports print (a 120-column terminal)
MAX_WIDTH = 120
#: most rows of the grouped table (stages × kinds of evidence); the rest are counted on one line
_MAX_ROWS = 12
#: most stages the grouping aims at
_MAX_STAGES = 10


@dataclass(frozen=True)
class DetectionRow:
    name: str
    shape: tuple[int, ...]
    reason: str
    group: str
    theory: GroupTheory
    #: the kind of evidence (:attr:`Candidate.kind <lightning_smd.core.detect.Candidate.kind>`): the
    #: grouped report's rows group by it; empty: by ``reason``
    kind: str = ""


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def format_detection_report(
    rows: list[DetectionRow],
    rejected: dict[str, str] | None = None,
    decayed_not_invariant: int = 0,
    total: int | None = None,
    dead: dict[str, str] | None = None,
    eps_dominated: dict[str, str] | None = None,
    units: Mapping[str, Any] | None = None,
    full: bool = True,
    full_table_at: str | None = None,
) -> str:
    """The scale-invariant tensors (why, group, lr/wd/momentum, Δ*) and the warnings.

    ``dead`` (name → why) and ``eps_dominated`` (name → why), e.g. from
    :func:`lightning_smd.core.detect.notes_from_recorder`, add two short sections: tensors no gradient
    ever reaches, and normalizations whose input variance is close to their eps. ``units`` (name →
    :class:`~lightning_smd.core.units.Unit`) adds the per-channel invariance units.

    ``full=True``: one row per tensor (every name in every section). ``full=False``: the grouped
    form, at most about 20 lines however large the model: one row per stage of the network and
    kind of evidence, long name lists folded to ``"a, b, c and N more"``, and a last line saying
    where the full table is (``full_table_at``).
    """
    if not full:
        return _grouped_report(rows, rejected or {}, decayed_not_invariant, total, dead or {}, eps_dominated or {},
                               units or {}, full_table_at)
    header = ["  #", "tensor", "shape", "why scale-invariant", "group", "lr", "wd", "mom", "Δ* (rad)"]
    if units:
        header.insert(3, "units")
    body = [
        [
            f"{i:3d}",
            r.name,
            "×".join(str(d) for d in r.shape),
            r.reason,
            r.group,
            _fmt(r.theory.lr),
            _fmt(r.theory.weight_decay),
            _fmt(r.theory.momentum, ".2g"),
            _fmt(r.theory.angular_update),
        ]
        for i, r in enumerate(rows)
    ]
    if units:
        for cells, r in zip(body, rows):
            cells.insert(3, str(units[r.name]) if r.name in units else "-")
    params = sum(_numel(r.shape) for r in rows)
    lines = [
        "SMD: scale-invariant tensors",
        _table(header, body),
        f"{len(rows)} scale-invariant tensors ({params:,} parameters)"
        + (f" of {total} trainable tensors" if total is not None else "")
        + f"; {decayed_not_invariant} other tensors get weight decay (fine: the SMD theory does not apply to them).",
    ]
    no_formula = {r.theory.reason for r in rows if r.theory.reason}
    for reason in sorted(no_formula):
        lines.append(f"WARNING: {reason}; Δ_t and ‖w_t‖ are still logged, without theory lines.")
    for name, why in sorted((rejected or {}).items()):
        lines.append(f"left out: {name}: {why}")
    lines.extend(_dead_section(dead or {}))
    lines.extend(_eps_section(eps_dominated or {}))
    return "\n".join(lines)


def _counts_line(rows: list[DetectionRow], decayed_not_invariant: int, total: int | None,
                 units: Mapping[str, Any]) -> str:
    params = sum(_numel(r.shape) for r in rows)
    unit_count = sum(units[r.name].count for r in rows if r.name in units)
    text = f"{len(rows)} scale-invariant tensors ({params:,} parameters"
    text += f", {unit_count:,} per-channel invariance units)" if units else ")"
    text += f" of {total} trainable tensors" if total is not None else ""
    return text + f"; {decayed_not_invariant} other tensors get weight decay (the SMD theory does not apply to them)."


def _stage_labels(names: list[str]) -> dict[str, str]:
    """Each parameter name → the label of its stage of the network: the deepest module prefix
    that leaves at most :data:`_MAX_STAGES` stages (``model.layer3``); when that is a single stage
    (``model.features``), the next level in runs of consecutive children (``model.features.1–6``)."""
    paths = {n: n.split(".")[:-1] or [n] for n in names}
    deepest = max((len(p) for p in paths.values()), default=1)

    def prefixes(depth: int) -> dict[str, str]:
        return {n: ".".join(p[:depth]) for n, p in paths.items()}

    depth, chosen = 1, prefixes(1)
    for d in range(1, deepest + 1):
        candidate = prefixes(d)
        if len(set(candidate.values())) > _MAX_STAGES:
            break
        depth, chosen = d, candidate
    if len(set(chosen.values())) > 2 or depth >= deepest:
        return chosen
    finer = prefixes(depth + 1)
    ordered = list(dict.fromkeys(finer[n] for n in names))
    size = math.ceil(len(ordered) / _MAX_STAGES)
    label: dict[str, str] = {}
    for i in range(0, len(ordered), size):
        run = ordered[i:i + size]
        first, last = run[0], run[-1]
        if len(run) == 1:
            text = first
        else:
            head, _, a = first.rpartition(".")
            b = last.rpartition(".")[2]
            text = f"{head}.{a}–{b}" if last.rpartition(".")[0] == head else f"{first} … {last}"
        label.update(dict.fromkeys(run, text))
    return {n: label[finer[n]] for n in names}


def _count_text(count: float) -> str:
    if count >= 1e6:
        return f"{count / 1e6:.1f} M"
    if count >= 1e4:
        return f"{count / 1e3:.0f} k"
    return f"{count:,.0f}"


def _units_text(units: list[Any]) -> str:
    if not units:
        return "-"
    kinds = {u.kind for u in units}
    count = sum(u.count for u in units)
    if kinds == {"tensor"}:
        return "whole tensors" if len(units) > 1 else "whole tensor"
    kind = kinds.pop() if len(kinds) == 1 else "unit"
    return f"{count:,} {kind}s"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _grouped_report(rows: list[DetectionRow], rejected: dict[str, str], decayed_not_invariant: int,
                    total: int | None, dead: dict[str, str], eps_dominated: dict[str, str],
                    units: Mapping[str, Any], full_table_at: str | None) -> str:
    stage = _stage_labels([r.name for r in rows])
    groups: dict[tuple, list[DetectionRow]] = {}
    for r in rows:
        t = r.theory
        key = (stage[r.name], r.kind or r.reason, r.group, t.lr, t.weight_decay, t.momentum,
               t.angular_update)
        groups.setdefault(key, []).append(r)
    header = ["layers", "tensors", "params", *(["units"] if units else []), "why scale-invariant", "group",
              "lr", "wd", "mom", "Δ* (rad)"]
    body, previous = [], None
    for key, members in groups.items():
        t = members[0].theory
        cells = [_clip(key[0], 28) if key[0] != previous else "", str(len(members)),
                 _count_text(sum(_numel(m.shape) for m in members))]
        if units:
            cells.append(_units_text([units[m.name] for m in members if m.name in units]))
        cells += [_clip(key[1], 40), _clip(key[2], 12), _fmt(t.lr), _fmt(t.weight_decay), _fmt(t.momentum, ".2g"),
                  _fmt(t.angular_update)]
        body.append(cells)
        previous = key[0]
    shown = body[:_MAX_ROWS]
    lines = ["SMD: scale-invariant tensors, by stage of the network"]
    if rows:
        lines.append(_table(header, shown))
    if len(body) > len(shown):
        hidden = sum(len(m) for m in list(groups.values())[_MAX_ROWS:])
        lines.append(f"  … {len(body) - len(shown)} more rows ({hidden} tensors)")
    lines.append(_counts_line(rows, decayed_not_invariant, total, units))
    for reason in sorted({r.theory.reason for r in rows if r.theory.reason}):
        lines.append(f"WARNING: {reason}; Δ_t and ‖w_t‖ are still logged, without theory lines.")
    if rejected:
        lines.append(f"left out ({len(rejected)}): {first_names(sorted(rejected))}")
    if dead:
        lines.append(f"Dead tensors ({len(dead)}): {first_names(sorted(dead))}: no gradient ever reaches them; "
                     "weight decay only shrinks them: exclude them from the optimizer or remove the bias.")
    if eps_dominated:
        lines.append(f"Eps-dominated ({len(eps_dominated)}): {first_names(sorted(eps_dominated))}: the normalization's "
                     "input variance is close to its eps.")
    if full_table_at:
        lines.append(f"Per tensor (why, units, shape): {full_table_at}")
    return "\n".join(_wrap(line) for line in lines)


def _wrap(text: str, width: int = MAX_WIDTH) -> str:
    """Lines longer than ``width`` wrapped at spaces (a table's lines are left whole)."""
    import textwrap

    out = []
    for line in text.split("\n"):
        if len(line) <= width:
            out.append(line)
        else:
            out += textwrap.wrap(line, width, subsequent_indent="    ", break_long_words=True, break_on_hyphens=False)
    return "\n".join(out)


def _section(header: str, entries: dict[str, str]) -> list[str]:
    return [header, *(f"  {name}: {why}" for name, why in sorted(entries.items()))] if entries else []


def _dead_section(dead: dict[str, str]) -> list[str]:
    return _section(
        f"Dead tensors ({len(dead)}): no gradient ever reaches them; weight decay only shrinks them: "
        "exclude them from the optimizer or remove the bias.", dead)


def _eps_section(eps_dominated: dict[str, str]) -> list[str]:
    return _section(
        f"Eps-dominated ({len(eps_dominated)}): scale-invariant by structure, but the normalization's input "
        "variance is within 100× its eps, so the scale still matters: left out (not tracked).",
        eps_dominated)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def first_names(names: list[str], shown: int = 3) -> str:
    """``"a, b, c and 4 more"``: the first ``shown`` of ``names`` for a one-line warning."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
