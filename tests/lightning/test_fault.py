"""A run that dies mid-training and resumes from its last checkpoint logs the series of an
uninterrupted run (single process here, with a rescale at an LR drop between the checkpoint and the
crash; the DDP and FSDP2 variants, where the restore comes after ``on_fit_start``, are in
``test_training_setups``)."""

from __future__ import annotations

import pytest
from pytorch_lightning.callbacks import ModelCheckpoint

from tests.dist_worker import Crash, CrashAt
from tests.setups_common import metrics_of, run_setup, smd_series

STEPS, CKPT, CRASH, DROP = 14, 6, 11, 8


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_crash_after_a_rescale_then_resume(tmp_path):
    kw = dict(steps=STEPS, model_kwargs={"step_indexed": True, "milestones": (DROP,)},
              callback_kwargs={"rescale": True})
    _, straight_cb = run_setup(tmp_path, "straight", **kw)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=CKPT, save_top_k=-1)
    with pytest.raises(Crash):
        run_setup(tmp_path, "crashed", callbacks=[ckpt, CrashAt(CRASH)], enable_checkpointing=True, **kw)
    # the rescale at step 8 happened in the dead run after the step-6 checkpoint: it must happen again
    _, resumed_cb = run_setup(tmp_path, "resumed", ckpt_path=str(tmp_path / "ckpt" / f"epoch=0-step={CKPT}.ckpt"), **kw)

    straight, resumed = smd_series(metrics_of(tmp_path, "straight")), smd_series(metrics_of(tmp_path, "resumed"))
    assert [e["step"] for e in resumed_cb.rescale_events] == [e["step"] for e in straight_cb.rescale_events] == [DROP]
    assert resumed["smd/rescale_factor"] == pytest.approx(straight["smd/rescale_factor"])
    assert min(resumed["smd/angular_update/net.0.weight"]) == CKPT
    for key, series in resumed.items():
        for step, value in series.items():
            assert value == pytest.approx(straight[key][step], rel=2e-4, abs=1e-7), (key, step)
    assert resumed_cb.unit_grad.get("net.0.weight") == pytest.approx(straight_cb.unit_grad.get("net.0.weight"), rel=1e-5)
