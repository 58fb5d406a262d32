"""The detection report printed once on rank 0, in the spirit of Lightning's ModelSummary."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_smd.theory import GroupTheory

__all__ = ["DetectionRow", "first_names", "format_detection_report"]


@dataclass(frozen=True)
class DetectionRow:
    name: str
    shape: tuple[int, ...]
    reason: str
    group: str
    theory: GroupTheory


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
) -> str:
    """A table of the scale-invariant tensors (why, group, lr/wd/momentum, Δ*) and the warnings.

    ``dead`` (name → why) and ``eps_dominated`` (name → why), e.g. from
    :func:`lightning_smd.detect.notes_from_recorder`, add two short sections: tensors no gradient
    ever reaches, and normalizations whose input variance is close to their eps.
    """
    header = ["  #", "tensor", "shape", "why scale-invariant", "group", "lr", "wd", "mom", "Δ* (rad)"]
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
