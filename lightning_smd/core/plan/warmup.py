"""LR warm-up recognition: pure, no torch, no Lightning.

A warm-up is a monotone rise of the learning rate at the start of training (linear, cosine,
exponential, per step or per epoch). For SMD it is not a sequence of LR stages: the network has
no equilibrium to reach while η climbs, so the ramp and the plateau it climbs to are *one* stage,
and the first real drop is measured against that plateau.

How it is recognized, per param group, from the learning rates the optimizer actually holds
(the trajectory; the planner, :func:`lightning_smd.core.plan.split_stages` rule 4, does the same on the
simulated schedule):

* ``warmup_steps=None`` (automatic): every LR change from the start of training that is a *rise*
  (with the weight decay unchanged) belongs to the warm-up; the first change that is not (a drop,
  or a change of the weight decay) ends it for good. A schedule that is constant at first and
  then rises is therefore also treated as a warm-up until its first drop.
* ``warmup_steps=N``: the changes at optimizer steps ``≤ N`` are the warm-up, whatever their
  direction; none after. ``warmup_steps=0`` turns recognition off (every change is a stage).
"""

from __future__ import annotations

from typing import Any

__all__ = ["WarmupTracker", "is_warmup_change"]

HParams = tuple[float, float]


def is_warmup_change(last: HParams, current: HParams, step: int, ramping: bool, warmup_steps: int | None) -> bool:
    """Whether the change ``last → current`` of (lr, weight decay) at optimizer step ``step`` is warm-up.

    ``ramping``: no change of this group has ended the warm-up yet (automatic mode only).
    """
    if warmup_steps is not None:
        return step <= warmup_steps
    return ramping and current[0] > last[0] and current[1] == last[1]


class WarmupTracker:
    """Per param group: is it still warming up, and at which step did its warm-up last rise.

    Feed every (lr, weight decay) change with :meth:`classify`; checkpoint with
    :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(self, warmup_steps: int | None = None) -> None:
        if warmup_steps is not None and (isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int)
                                         or warmup_steps < 0):
            raise ValueError(f"WarmupTracker(warmup_steps=...) must be None (recognize a warm-up from the LR) or an "
                             f"int >= 0 (0: no warm-up), got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.ended: set[str] = set()
        self.last_rise: dict[str, int] = {}  # group -> step of its last warm-up change

    def classify(self, group: str, last: HParams, current: HParams, step: int) -> bool:
        """``True`` when this change is part of the group's warm-up (then no stage, no rescale)."""
        warm = is_warmup_change(last, current, step, group not in self.ended, self.warmup_steps)
        if warm:
            self.last_rise[group] = step
        else:
            self.ended.add(group)
        return warm

    def ramp_end(self, group: str) -> int | None:
        """The step of the group's last warm-up change, ``None`` when it had none."""
        return self.last_rise.get(group)

    def state_dict(self) -> dict[str, Any]:
        return {"ended": sorted(self.ended), "last_rise": dict(self.last_rise)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ended = set(state["ended"])
        self.last_rise = {k: int(v) for k, v in state["last_rise"].items()}
