"""Resume from a checkpoint taken during detection, with a rescale deferred until detection ends
(LR drop at step 1, checkpoint at step 2): the resumed run must be bit-equal to the uninterrupted one."""

from __future__ import annotations

import warnings

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_smd import SMDCallback
from tests.helpers import fit
from tests.models import NoisyRayleighQuotient


@pytest.mark.slow
def test_resume_during_detection_is_bit_equal(tmp_path):
    kw = dict(p=16, sigma=0.5, lr=0.1, weight_decay=0.05, milestones=[1], gamma=0.1, init_norm=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = NoisyRayleighQuotient(**kw)
        cb = SMDCallback(log_every_n_steps=1, rescale=True, verbose=False)
        fit(straight, tmp_path / "straight", [cb], max_steps=30)
        first = NoisyRayleighQuotient(**kw)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
        fit(first, tmp_path / "first", [SMDCallback(log_every_n_steps=1, rescale=True, verbose=False), ckpt],
            max_steps=2, enable_checkpointing=True)
        resumed = NoisyRayleighQuotient(**kw)
        cb2 = SMDCallback(log_every_n_steps=1, rescale=True, verbose=False)
        fit(resumed, tmp_path / "resumed", [cb2], max_steps=30, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)["callbacks"]["SMDCallback"]
    assert saved["tracked"] is None and saved["deferred_rescales"]  # undecided, the rescale owed
    assert saved["detection"]["steps"] == {0: 2} and saved["detection"]["radial"][0]["steps"] == 1
    assert [e["step"] for e in cb.rescale_events] == [cb.detect_steps]
    assert cb2.candidates == cb.candidates  # decided on the same evidence (not "restored from checkpoint")
    assert [e["step"] for e in cb2.rescale_events] == [e["step"] for e in cb.rescale_events]
    torch.testing.assert_close(resumed.X.detach(), straight.X.detach(), rtol=0, atol=0)
