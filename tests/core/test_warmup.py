"""LR warm-up is one stage: in the plan, in the end-of-fit table and in the metrics (issue 27).

Before recognition, every warm-up step of a per-step schedule started a new equilibrium stage,
logged ``smd/steps_to_equilibrium/predicted/<group>`` and (with ``RescalePolicy(on_increase=True)``) rescaled.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_smd import RescalePolicy, SMDCallback
from lightning_smd.core.plan.warmup import WarmupTracker, is_warmup_change
from tests.helpers import fit, read_metrics
from tests.models import NoisyRayleighQuotient

LR, WD = 0.2, 5e-3


def linear(warmup: int):
    return lambda t: (t + 1) / warmup if t < warmup else 1.0


def cosine(warmup: int):
    return lambda t: 0.5 * (1 - math.cos(math.pi * (t + 1) / warmup)) if t < warmup else 1.0


class WarmupNRQ(NoisyRayleighQuotient):
    """The NRQ under SGD + a warm-up (``ramp``) then ×0.1 at ``drop`` (in scheduler ticks)."""

    def __init__(self, ramp, drop: int, interval: str):
        super().__init__(p=32, lr=LR, weight_decay=WD)
        self.ramp, self.drop, self.interval = ramp, drop, interval

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=LR, weight_decay=WD)
        ramp, drop = self.ramp, self.drop
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: ramp(t) * (0.1 if t >= drop else 1.0))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}


def test_trajectory_rules():
    """Rises from the start are warm-up until the first change that is not a rise; an explicit
    ``warmup_steps`` overrides the guess; 0 turns it off."""
    assert is_warmup_change((0.1, 1e-4), (0.2, 1e-4), 5, True, None)
    assert not is_warmup_change((0.2, 1e-4), (0.1, 1e-4), 5, True, None)
    assert not is_warmup_change((0.1, 1e-4), (0.2, 1e-3), 5, True, None)  # weight decay changed too
    tracker = WarmupTracker()
    lrs = [0.01 * (i + 1) for i in range(10)] + [0.01, 0.02]  # ramp, drop, then a later rise
    seen = [tracker.classify("g", (a, 1.0), (b, 1.0), i + 1) for i, (a, b) in enumerate(zip(lrs, lrs[1:]))]
    assert seen == [True] * 9 + [False, False]
    assert tracker.ramp_end("g") == 9
    explicit = WarmupTracker(3)
    assert [explicit.classify("g", (1.0, 1.0), (0.5, 1.0), s) for s in (1, 3, 4)] == [True, True, False]
    assert not WarmupTracker(0).classify("g", (0.1, 1.0), (0.2, 1.0), 1)
    with pytest.raises(ValueError, match="warmup_steps"):
        SMDCallback(warmup_steps=-1)
    # checkpointed: a resume mid-ramp keeps ramping, one after its end does not ramp again
    resumed = WarmupTracker()
    resumed.load_state_dict(WarmupTracker().state_dict())
    assert resumed.classify("g", (0.1, 1.0), (0.2, 1.0), 3)
    ended = WarmupTracker()
    ended.load_state_dict(tracker.state_dict())
    assert not ended.classify("g", (0.1, 1.0), (0.2, 1.0), 3)


SLOW = pytest.mark.slow


@pytest.mark.parametrize(("shape", "rescale"), [
    ("linear", True),
    pytest.param("linear", False, marks=SLOW), pytest.param("linear", "continuous", marks=SLOW),
    pytest.param("linear", "equilibrium", marks=SLOW), pytest.param("cosine", False, marks=SLOW),
    pytest.param("cosine", True, marks=SLOW), pytest.param("cosine", "continuous", marks=SLOW),
    pytest.param("cosine", "equilibrium", marks=SLOW),
])
def test_per_step_warmup_is_one_stage(tmp_path, shape, rescale):
    """20 warm-up steps, a ÷10 drop at step 30: two stages (not 21), one prediction (for the drop,
    from the plateau's η), and no rescale before the drop in any mode, even with on_increase=True."""
    ramp = linear(20) if shape == "linear" else cosine(20)
    policy = RescalePolicy("drop" if rescale is True else rescale, on_increase=True) if rescale else False
    cb = SMDCallback(log_every_n_steps=1, rescale=policy, verbose=False, per_channel=False)
    trainer = fit(WarmupNRQ(ramp, drop=30, interval="step"), tmp_path, [cb], max_steps=34)
    stages = cb.equilibrium.stages
    assert [s.start_step for s in stages] == [0, 30], [s.start_step for s in stages]
    assert stages[0].warmup_until == 19 and stages[0].predicted_steps is None
    assert stages[1].predicted_steps is not None
    predicted = {k: v for k, v in read_metrics(trainer).items() if k.startswith("smd/steps_to_equilibrium/predicted")}
    assert len(predicted) == 1 and list(next(iter(predicted.values()))) == [30], predicted
    assert all(e["step"] >= 30 for e in cb.rescale_events), cb.rescale_events
    if rescale:
        drop = [e for e in cb.rescale_events if e["step"] == 30]
        assert len(drop) == 1 and drop[0]["lr"] == pytest.approx([LR, LR / 10]), cb.rescale_events
    assert [len(cb.plan.stages_of(g)) for g in cb.plan.groups] == [2]
    table = cb.equilibrium.summary()
    assert "LR warm-up until step 19" in table and len(table.splitlines()) == 3 + 2 + 1


@SLOW
@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_per_epoch_warmup_is_one_stage(tmp_path, shape):
    """A 4-epoch warm-up stepped per epoch (10 steps each), ÷10 at epoch 6: two stages."""
    ramp = linear(4) if shape == "linear" else cosine(4)
    cb = SMDCallback(log_every_n_steps=1, rescale=True, verbose=False, per_channel=False)
    fit(WarmupNRQ(ramp, drop=6, interval="epoch"), tmp_path, [cb], max_steps=-1, max_epochs=7,
        limit_train_batches=10)
    stages = cb.equilibrium.stages
    assert [s.start_step for s in stages] == [0, 60] and stages[0].warmup_until == 30
    assert [e["step"] for e in cb.rescale_events] == [60]
    assert [len(cb.plan.stages_of(g)) for g in cb.plan.groups] == [2]


@SLOW
def test_explicit_warmup_steps(tmp_path):
    """``warmup_steps=0``: the ramp is measured as stages again (the old behaviour, on request)."""
    cb = SMDCallback(log_every_n_steps=1, warmup_steps=0, verbose=False, per_channel=False)
    fit(WarmupNRQ(linear(5), drop=40, interval="step"), tmp_path, [cb], max_steps=45)
    assert len(cb.equilibrium.stages) == 4 + 1  # one per ramp step, one for the drop
    assert [len(cb.plan.stages_of(g)) for g in cb.plan.groups] == [3 + 1]  # 0.2 | 0.4, 0.6 | 0.8, 1.0 (cut per ×2) | the drop
    cb = SMDCallback(log_every_n_steps=1, warmup_steps=50, verbose=False, per_channel=False)
    fit(WarmupNRQ(linear(5), drop=40, interval="step"), tmp_path / "b", [cb], max_steps=45)
    assert len(cb.equilibrium.stages) == 1 and cb.equilibrium.stages[0].warmup_until == 40  # the drop too
    assert [len(cb.plan.stages_of(g)) for g in cb.plan.groups] == [1]
