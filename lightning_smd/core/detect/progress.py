"""Detection's progress while it has not decided: the evidence gathered so far, as a checkpoint keeps it.

Detection takes a few optimizer steps (the first forward's dataflow, then the radial cosines of
``DetectionOptions.steps`` updates per optimizer). A checkpoint taken in between keeps this evidence, so the
resumed run decides on the same evidence at the same step as an uninterrupted one, and a rescale
deferred until the decision is applied at the same step (bit-equal weights).

Not kept: the inputs of the recorded forward that the finite-difference check ``L(2w) = L(w)`` of
numerical discoveries re-runs (a batch can be large and of any type). A resumed run keeps the inputs
of its first forward after the resume instead; the check's verdict does not depend on the batch for
a tensor that is (or is not) scale-invariant at generic points.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable

from torch import Tensor

from lightning_smd.core.detect.api import DetectionNotes
from lightning_smd.core.detect.candidate import Candidate
from lightning_smd.core.detect.numerics import RadialCosineCheck

__all__ = ["DetectionProgress"]


class DetectionProgress:
    """The evidence of an undecided detection, by optimizer index (stable across a resume).

    Attributes:
        names: the tensors being decided on (all trainable ones, or those added to the optimizers).
        structural: the structural candidates of the recorded forward (``None`` before it ran).
        notes: dead and eps-dominated tensors of that forward.
        recorded: the structural evidence came from a recorded forward (its inputs are kept for
            the finite-difference check, and are recorded again after a resume).
        steps: per optimizer, its steps seen (the first is not checked: cosines need an update).
        restored: loaded from a checkpoint and not yet taken up by a detection session.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.names: list[str] = []
        self.structural: dict[str, Candidate] | None = None
        self.notes: DetectionNotes | None = None
        self.recorded = False
        self.steps: dict[int, int] = {}
        self.restored = False
        self._radial: dict[int, RadialCosineCheck] = {}
        self._saved_radial: dict[int, dict[str, Any]] = {}

    def radial_check(self, index: int, named_params: list[tuple[str, Tensor]],
                     reduce_fn: Callable[[Tensor], Tensor] | None) -> RadialCosineCheck:
        """The radial-cosine check of optimizer ``index``, made on first use (continuing a checkpoint's)."""
        check = self._radial.get(index)
        if check is None:
            check = self._radial[index] = RadialCosineCheck(named_params, reduce_fn=reduce_fn)
            if (saved := self._saved_radial.pop(index, None)) is not None:
                check.load_state_dict(saved)
        return check

    def radial_steps(self, index: int) -> int:
        """Updates checked so far for optimizer ``index``."""
        if index in self._radial:
            return self._radial[index].steps
        return int(self._saved_radial.get(index, {}).get("steps", 0))

    def cosines(self) -> dict[str, float]:
        """The maximum radial cosine per tensor over every optimizer's checked updates."""
        out: dict[str, float] = {}
        for saved in self._saved_radial.values():
            out.update(saved["max"])
        for check in self._radial.values():
            out.update(check.result())
        return out

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any] | None:
        """Plain data (a checkpoint loads with ``torch.load(weights_only=True)``); ``None`` before
        the first forward was recorded (nothing to keep)."""
        if self.structural is None:
            return None
        radial = {i: dict(s) for i, s in self._saved_radial.items()}
        radial.update({i: check.state_dict() for i, check in self._radial.items()})
        return {
            "names": list(self.names),
            "structural": {n: _fields(c) for n, c in self.structural.items()},
            "notes": _fields(self.notes) if self.notes is not None else None,
            "recorded": self.recorded,
            "steps": dict(self.steps),
            "radial": radial,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.clear()
        if state is None:
            return
        self.names = list(state["names"])
        self.structural = {n: Candidate(**_known(Candidate, c)) for n, c in state["structural"].items()}
        self.notes = DetectionNotes(**_known(DetectionNotes, state["notes"])) if state["notes"] is not None else None
        self.recorded = bool(state["recorded"])
        self.steps = {int(i): int(n) for i, n in state["steps"].items()}
        self._saved_radial = {int(i): {"steps": int(s["steps"]), "max": dict(s["max"])} for i, s in state["radial"].items()}
        self.restored = True


def _fields(record: Any) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in fields(record)}


def _known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}
