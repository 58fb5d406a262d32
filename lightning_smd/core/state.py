"""``SMDState``: everything a checkpoint keeps, owned by one object (torch only).

The adapters (``SMDCallback``, ``SMDMonitor``) and the parts they drive (the schedule watcher, the
metrics builder, detection) read and update the parts held here; ``state_dict`` /
``load_state_dict`` are this object's, and ``reset`` starts a new run from nothing.

What it holds:

* ``unit_grad``: the running L per tensor; ``update_sq``: the running ū² of AdamW/Lion/Muon tensors;
* ``equilibrium``: the LR stages and their equilibrium windows; ``channels``: the per-unit running L
  and stall windows (``per_channel``);
* ``warmup``: which param groups are past their LR warm-up;
* ``schedule`` (:class:`ScheduleMemory`): per param group the last (η, λ), peak η, last non-zero
  (η, λ) and the rescales deferred until detection decides; every rescale applied; the warm start;
* ``candidates``: the tracked tensors once detection decided (``pending``: their names from a
  checkpoint, until tracking is rebuilt), their invariance ``units``, and ``detection``
  (:class:`~lightning_smd.core.detect.progress.DetectionProgress`): the evidence of a detection
  that has not decided yet (at fit start, or on tensors added to the optimizers later);
* ``arguments``: the adapter's arguments that shape measurement, compared at a resume.

The checkpoint is plain data (``torch.load(weights_only=True)`` reads it). Format 2 adds the
detection progress to format 1, which still loads (a detection undecided then starts again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_smd.core.channels import ChannelMetrics
from lightning_smd.core.detect.candidate import Candidate
from lightning_smd.core.detect.progress import DetectionProgress
from lightning_smd.core.equilibrium import EquilibriumTracker
from lightning_smd.core.estimates import RunningMean
from lightning_smd.core.plan.warmup import WarmupTracker
from lightning_smd.core.units import Unit

__all__ = ["STATE_VERSION", "SMDState", "ScheduleMemory"]

#: the checkpoint format written; the formats read
STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)

HParams = tuple[float, float]


@dataclass
class ScheduleMemory:
    """What the schedule watcher remembers between steps, per param group (by its label)."""

    last_hparams: dict[str, HParams] = field(default_factory=dict)  # the (η, λ) seen at its last step
    peak_lr: dict[str, float] = field(default_factory=dict)
    reference: dict[str, HParams] = field(default_factory=dict)  # the last (η, λ) with η·λ > 0
    deferred: dict[str, dict[str, Any]] = field(default_factory=dict)  # rescales owed until detection decides
    rescale_events: list[dict[str, Any]] = field(default_factory=list)  # every rescale (and warm start) applied
    warm_start_done: bool = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_hparams": {k: list(v) for k, v in self.last_hparams.items()},
            "peak_lr": dict(self.peak_lr),
            "rescale_events": list(self.rescale_events),
            "deferred_rescales": dict(self.deferred),
            "reference_hparams": {k: list(v) for k, v in self.reference.items()},
            "warm_start_done": self.warm_start_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_hparams = {k: (float(v[0]), float(v[1])) for k, v in state["last_hparams"].items()}
        self.peak_lr = {k: float(v) for k, v in state["peak_lr"].items()}
        self.rescale_events = list(state["rescale_events"])
        self.deferred = dict(state["deferred_rescales"])
        self.reference = {k: (float(v[0]), float(v[1])) for k, v in state["reference_hparams"].items()}
        self.warm_start_done = bool(state["warm_start_done"])


class SMDState:
    """Everything a checkpoint keeps (see the module docstring); ``reset`` for a new run.

    Args:
        ema_steps: time constant of the running L and ū² (and the per-unit L).
        equilibrium_tolerance, equilibrium_window: of the equilibrium tracker (and the stall window).
        per_channel: keep per-unit state (:class:`ChannelMetrics`).
        warmup_steps: of the :class:`WarmupTracker`.
        arguments: the adapter's arguments that shape measurement (plain values), checkpointed.
    """

    def __init__(self, ema_steps: float = 200.0, equilibrium_tolerance: float = 0.1, equilibrium_window: int = 200,
                 per_channel: bool = True, warmup_steps: int | None = None,
                 arguments: dict[str, Any] | None = None) -> None:
        self._ema_steps = ema_steps
        self._equilibrium = (equilibrium_tolerance, equilibrium_window)
        self._per_channel = per_channel
        self._warmup_steps = warmup_steps
        self.arguments = dict(arguments or {})
        self.reset()

    def reset(self) -> None:
        """A new run: nothing of an earlier one is kept (the parts are made anew)."""
        self.unit_grad = RunningMean(self._ema_steps, positive=True)
        self.update_sq = RunningMean(self._ema_steps)
        self.equilibrium = EquilibriumTracker(*self._equilibrium)
        self.channels = ChannelMetrics(self._equilibrium[1], self._ema_steps) if self._per_channel else None
        self.warmup = WarmupTracker(self._warmup_steps)
        self.schedule = ScheduleMemory()
        self.detection = DetectionProgress()
        self.candidates: dict[str, Candidate] = {}
        self.pending: list[str] | None = None
        self.units: dict[str, Unit] = {}

    @property
    def tracked_names(self) -> list[str] | None:
        """The tracked tensors' names, ``None`` while detection has not decided."""
        return sorted(self.candidates) if self.candidates else self.pending

    def state_dict(self) -> dict[str, Any]:
        names = self.tracked_names
        return {
            "version": STATE_VERSION,
            "unit_grad": self.unit_grad.state_dict(),
            "update_rms_sq": self.update_sq.state_dict(),
            "equilibrium": self.equilibrium.state_dict(),
            "warmup": self.warmup.state_dict(),
            **self.schedule.state_dict(),
            "tracked": names,
            "arguments": dict(self.arguments),
            "units": {n: [u.count, u.kind, u.why] for n, u in self.units.items()},
            "channels": self.channels.state_dict() if self.channels is not None else {},
            "detection": self.detection.state_dict(),  # None unless a detection is under way
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every part (the checkpointed run's ``arguments`` stay in ``state["arguments"]``,
        for the adapter to compare with its own)."""
        version = state.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"lightning_smd: unknown checkpoint state version {version!r} (this version reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}); the checkpoint was written by another "
                             "version of lightning_smd.")
        self.unit_grad.load_state_dict(state["unit_grad"])
        self.update_sq.load_state_dict(state["update_rms_sq"])
        self.equilibrium.load_state_dict(state["equilibrium"])
        self.warmup.load_state_dict(state["warmup"])
        self.schedule.load_state_dict(state)
        self.candidates, self.pending = {}, state["tracked"]
        self.units = {n: Unit(int(c), str(k), str(w)) for n, (c, k, w) in (state["units"] or {}).items()}
        if self.channels is not None:
            self.channels.load_state_dict(state["channels"] or {})
        self.detection.load_state_dict(state.get("detection"))
