"""One ``SMDCallback`` instance across fits: a new Trainer on a new model starts fresh (nothing
carried over from the previous run: no rescale from its LR, no stages, no records); ``trainer.fit``
again on the same Trainer and model, to train longer, continues (no second detection)."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch

from lightning_smd import SMDCallback
from tests.models import NoisyRayleighQuotient


def _trainer(root, cb, steps):
    return pl.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=root, logger=False, callbacks=[cb],
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      log_every_n_steps=1)


def _final(root, cb, steps=30, lr=0.01):
    module = NoisyRayleighQuotient(p=16, sigma=0.5, lr=lr, weight_decay=0.05, init_norm=2.0, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(root, cb, steps).fit(module)
    return module.X.detach().clone()


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_second_trainer_on_a_new_model_starts_fresh(tmp_path):
    reused = SMDCallback(log_every_n_steps=1, rescale=True, verbose=False)
    first = NoisyRayleighQuotient(p=16, sigma=0.5, lr=0.1, weight_decay=0.05, init_norm=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path / "a", reused, 20).fit(first)  # ends at LR 0.1
    second = _final(tmp_path / "b", reused)  # a new model at a constant 0.01
    fresh = _final(tmp_path / "c", SMDCallback(log_every_n_steps=1, rescale=True, verbose=False))
    assert reused.rescale_events == []
    torch.testing.assert_close(second, fresh, rtol=0, atol=0)
    assert min(step for step, _ in reused.records) < 20  # the records are the new run's, from its start
    assert len(reused.equilibrium.stages) <= 1


@pytest.mark.slow  # default-tier budget
def test_fit_again_on_the_same_trainer_continues(tmp_path):
    cb = SMDCallback(log_every_n_steps=1, verbose=False)
    module = NoisyRayleighQuotient(p=16, sigma=0.5, lr=0.1, weight_decay=0.05, init_norm=2.0)
    trainer = _trainer(tmp_path, cb, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
        tracked = dict(cb.candidates)
        trainer.fit_loop.epoch_loop.max_steps = 16
        trainer.fit(module)
    assert trainer.global_step == 16
    logged = {step for step, m in cb.records if any(k.startswith("smd/angular_update/") for k in m)}
    assert {12, 13, 14, 15} <= logged  # measured, not spent on a second detection
    assert set(cb.candidates) == set(tracked)
