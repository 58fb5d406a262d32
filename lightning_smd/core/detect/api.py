"""The user-facing helper: ``find_scale_invariant(model, batch)`` runs both detections and decides."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_smd.core.detect.candidate import Candidate, clean_name
from lightning_smd.core.detect.decision import DETECT_MODES, decide, normalization_parameters, select
from lightning_smd.core.detect.numerics import radial_cosines, confirm_scale_invariance, precision_floor
from lightning_smd.core.detect.structure import DataflowRecorder, recorded_forward, structural_candidates

__all__ = ["DetectionNotes", "detection_notes", "find_scale_invariant", "notes_from_recorder"]


def find_scale_invariant(
    module: nn.Module,
    *args: Any,
    include: Any = None,
    exclude: Any = None,
    detect: str = "auto",
    threshold: float = 1e-4,
    **kwargs: Any,
) -> list[Candidate]:
    """Find the scale-invariant parameter tensors of ``module`` for the input ``*args, **kwargs``.

    Args:
        module: the model; left unchanged (train/eval modes, buffers and RNG are restored; the
            numerical check runs on a deep copy).
        *args, **kwargs: one input batch, passed as ``module(*args, **kwargs)``. BatchNorm
            runs in train mode, so use a batch of at least 2.
        include, exclude: filters on parameter names, see :func:`select`.
        detect: ``"structural"``: dataflow rules only (:func:`structural_candidates`);
            ``"numerical"``: radial cosine below ``threshold`` after one backward of a fixed
            random projection of the outputs (dicts of scalar losses are summed);
            ``"auto"``: structural candidates confirmed numerically (unconfirmed ones, and
            eps-dominated ones, see :func:`decide`, are dropped with a warning) plus numerically invariant tensors that the structure
            could not explain.
        threshold: radial cosine under which a structural candidate is confirmed (at least the
            rounding floor of 16-bit tensors). A tensor structure did not explain counts only
            with ``cos < discovery_threshold(threshold, numel)`` (``≤ 1e-2/√numel``) *and* the
            finite-difference check ``L(2w) = L(w)`` at a generic point
            (:func:`~lightning_smd.core.detect.numerics.confirm_scale_invariance`).

    Returns:
        Candidates in parameter order.

    Note:
        Numerical discoveries measured at initialisation can be false positives: e.g. a
        BatchNorm γ whose β is still zero feeds a ReLU and then another normalization, which
        makes it invariant *until β moves*. Normalization layers' own parameters are therefore
        never discovered numerically (see :func:`decide`), and ``SMDCallback`` runs its
        numerical check over several steps after the first optimizer update.
    """
    if detect not in DETECT_MODES:
        allowed = ", ".join(map(repr, DETECT_MODES))
        raise ValueError(f"detect must be one of {allowed}, got {detect!r}")
    recorder = recorded_forward(module, args, kwargs) if detect != "numerical" else None
    structural = (recorder.candidates or {}) if recorder is not None else {}
    notes = notes_from_recorder(recorder) if recorder is not None else DetectionNotes({}, {})
    cosines = radial_cosines(module, args, kwargs) if detect != "structural" else {}
    params = {clean_name(n): p for n, p in module.named_parameters()}
    dtypes = {n: p.dtype for n, p in params.items()}
    # 16-bit tensors: structure is confirmed at the format's rounding floor (as the callback does)
    floor = max((precision_floor(dtypes[n]) for n in structural if n in dtypes), default=0.0)
    replica: list[nn.Module] = []

    def confirm(names: list[str]) -> dict[str, str | None]:
        if not replica:
            replica.append(copy.deepcopy(module).train())
        return confirm_scale_invariance(replica[0], names, lambda: replica[0](*args, **kwargs))

    found, rejected = decide(
        structural, cosines, detect, threshold, normalization_parameters(module), max(threshold, floor),
        numels={n: p.numel() for n, p in params.items()}, dtypes=dtypes, confirm=confirm,
        eps_dominated=notes.eps_dominated, eps_defect=notes.eps_defect,
    )
    dropped = {n: why for n, why in rejected.items() if n in structural}
    if dropped:
        warnings.warn(
            "structural scale-invariance candidates not confirmed numerically, dropped: "
            + "; ".join(f"{n}: {why}" for n, why in dropped.items()),
            stacklevel=2,
        )
    order = [clean_name(n) for n, _ in module.named_parameters()]
    names = select([n for n in order if n in found], include, exclude)
    return [found[n] for n in names]



@dataclass(frozen=True)
class DetectionNotes:
    """What the detection report says besides the invariant tensors.

    Attributes:
        dead: name → why no gradient ever reaches it (a bias, or a norm's β, whose per-channel
            constant the following normalization removes).
        eps_dominated: name → why: invariant by structure, but the normalization's input
            variance is within ``EPS_MARGIN``·eps (or a weight-standardizing eps moves the
            output): left out by :func:`decide`; not finding it is no miss.
        eps_defect: name → ``eps/(var+eps)`` of the normalizations a structural candidate feeds:
            how far from exactly invariant eps makes it (its radial cosine is at most about this).
    """

    dead: dict[str, str]
    eps_dominated: dict[str, str]
    eps_defect: dict[str, float] = field(default_factory=dict)


def notes_from_recorder(recorder: DataflowRecorder) -> DetectionNotes:
    """The notes of a :class:`DataflowRecorder` after :meth:`~DataflowRecorder.stop`."""
    return DetectionNotes(dict(recorder.dead), dict(recorder.eps_dominated), dict(recorder.eps_defect))


def detection_notes(module: nn.Module, *args: Any, **kwargs: Any) -> DetectionNotes:
    """Dead and eps-dominated tensors of ``module`` from ONE forward ``module(*args, **kwargs)``,
    with the same side-effect-free pass as :func:`structural_candidates`."""
    recorder = recorded_forward(module, args, kwargs)
    return notes_from_recorder(recorder)
