"""Strategy-specific behaviour: ddp_spawn (pickled module, rank 0's CSV), SyncBatchNorm conversion
in setup, FSDP1's flat parameters, collectives outside rank-zero branches, DeepSpeed.

The DDP / FSDP2 equality matrix and the fault test are in ``test_training_setups``.
"""

from __future__ import annotations

import types

import pytest
import torch

from lightning_smd import SMDCallback
from lightning_smd.lightning.view import check_supported
from tests.setups_common import CPUSyncBN, TinyBNNet, TinyNet, metrics_of, run_setup, smd_series
from tests.lightning.test_training_setups import assert_same_series

STEPS = 10


@pytest.mark.slow
def test_ddp_spawn_sync_batchnorm_equals_single_process(tmp_path):
    """Trainer(sync_batchnorm=True) replaces the BatchNorms in strategy.setup, after the module was
    built and before the optimizer is: detection must see the SyncBatchNorm as a normalization, and
    the tracked tensors must be the optimizer's. With synchronized batch statistics, 2 spawned
    processes on half batches equal one process on the whole batch; the detection result is
    broadcast from rank 0 under ddp_spawn (the callback state does not come back: read rank 0's CSV)."""
    run_setup(tmp_path, "single", steps=STEPS, module_cls=TinyBNNet)
    run_setup(tmp_path, "spawn", steps=STEPS, module_cls=TinyBNNet, strategy="ddp_spawn", devices=2,
              sync_batchnorm=True, plugins=[CPUSyncBN()])
    spawn, single = metrics_of(tmp_path, "spawn"), metrics_of(tmp_path, "single")
    assert "smd/angular_update/net.0.weight" in spawn  # Linear → SyncBatchNorm found
    assert not any("net.3" in k for k in spawn)  # the classifier is not invariant
    assert_same_series(spawn, single, rel=2e-4, what="ddp_spawn + SyncBatchNorm")


def test_fsdp1_flat_parameters_are_refused_with_a_clear_error():
    from torch.distributed.fsdp._flat_param import FlatParameter

    flat = FlatParameter(torch.zeros(8), requires_grad=True)  # what use_orig_params=False gives the optimizer
    trainer = types.SimpleNamespace(strategy=object(), optimizers=[torch.optim.SGD([flat], lr=0.1)])
    with pytest.raises(RuntimeError, match="use_orig_params=True"):
        check_supported(trainer)


def test_deepspeed_is_refused_with_a_clear_error():
    DeepSpeedStrategy = type("DeepSpeedStrategy", (), {})  # noqa: N806 - matched by class name, no CUDA here
    trainer = types.SimpleNamespace(strategy=DeepSpeedStrategy(), optimizers=[])
    with pytest.raises(RuntimeError, match="DeepSpeedStrategy"):
        check_supported(trainer)


def test_figures_path_does_not_broadcast(tmp_path, monkeypatch):
    """on_fit_end renders figures on rank 0 only: reading trainer.log_dir there would run a
    broadcast on one rank and hang every multi-process run at its end."""
    import pytorch_lightning as pl

    def no_broadcast(self, obj, src=0):
        raise AssertionError("strategy.broadcast called from the figures path")

    trainer, cb = run_setup(tmp_path, "run", steps=6)
    monkeypatch.setattr(type(trainer.strategy), "broadcast", no_broadcast)
    assert cb.figures_path(trainer) == tmp_path / "run" / "version_0" / "smd"
    assert isinstance(trainer, pl.Trainer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDPStrategy (FSDP1) requires CUDA in Lightning 2.6")
def test_fsdp1_use_orig_params_equals_single_device(tmp_path):
    from pytorch_lightning.strategies import FSDPStrategy

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    def fit(name, strategy):
        cb = SMDCallback(log_every_n_steps=1, verbose=False)
        trainer = pl.Trainer(accelerator="cuda", devices=1, strategy=strategy, max_steps=STEPS,
                             logger=CSVLogger(tmp_path, name=name, version=0), callbacks=[cb], log_every_n_steps=1,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             use_distributed_sampler=False)
        trainer.fit(TinyNet(steps=STEPS))
        return metrics_of(tmp_path, name)

    single = fit("single", "auto")
    fsdp = fit("fsdp1", FSDPStrategy(use_orig_params=True, auto_wrap_policy={torch.nn.Linear}))
    assert_same_series(smd_series(fsdp), smd_series(single), rel=1e-3, what="FSDP1")
