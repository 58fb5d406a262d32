"""Distributed strategies of the examples on CPU: DDP (spawn, gloo), FSDP2, Hydra multirun;
FSDP1 and DeepSpeed are compose-only here (CUDA / package needed)."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.examples_fixtures import TINY, TRAIN_PY, composed, metrics_columns, subprocess_env

from examples.train import train
from examples.validate import ConfigError

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
)


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path) as f:
        return list(csv.DictReader(f))


def _smd_rows(csv_path: Path) -> int:
    return sum(1 for row in _rows(csv_path) if row.get("smd/angular_update_ratio/mean"))


@pytest.mark.slow
def test_ddp_spawn_two_processes_through_train(tmp_path):
    overrides = [*TINY, "experiment=quickstart", "strategy=ddp_spawn", "trainer.devices=2",
                 "trainer.limit_train_batches=8", "data.batch_size=16"]
    with composed(overrides, tmp_path / "run") as cfg:
        assert cfg.strategy.start_method == "spawn"
        result = train(cfg)
    # ddp_spawn returns callback_metrics and weights to the parent, not the loop counters
    steps = [int(r["step"]) for r in _rows(Path(result["metrics_csv"])) if r.get("smd/angular_update_ratio/mean")]
    assert max(steps) == 7  # 8 optimizer steps on each rank (steps 0..7)
    cols = metrics_columns(result["metrics_csv"])
    assert "smd/angular_update/model.features.0.weight" in cols
    assert _smd_rows(Path(result["metrics_csv"])) >= 3
    assert "val/acc" in result["metrics"]  # recovered from rank 0
    assert any((Path(result["output_dir"]) / "smd").glob("*.png"))


@pytest.mark.slow
def test_multirun_sweep_over_smd_settings(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(TRAIN_PY), "-m", "experiment=quickstart", "smd.log_every_n_steps=1,4",
           "trainer.max_epochs=1", "trainer.limit_train_batches=12", "trainer.limit_val_batches=1",
           "trainer.enable_progress_bar=false", "print_config=false", "smd.verbose=false",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for job, every in (("0", 1), ("1", 4)):
        run = sweep / job
        assert (run / ".hydra" / "config.yaml").is_file()
        assert f"smd.log_every_n_steps={every}" in (run / ".hydra" / "overrides.yaml").read_text()
        assert any((run / "smd").glob("*.png"))
        rows[every] = _smd_rows(run / "version_0" / "metrics.csv")
    assert rows[1] > rows[4] >= 1


@pytest.mark.slow
def test_fsdp2_model_parallel_strategy_on_cpu(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(TRAIN_PY), "experiment=quickstart", "strategy=fsdp2", "trainer.devices=2",
           "trainer.max_epochs=1", "trainer.limit_train_batches=8", "trainer.limit_val_batches=1",
           "trainer.enable_progress_bar=false", "print_config=false", "smd.log_every_n_steps=1",
           f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / ".hydra" / "config.yaml").is_file()
    cols = metrics_columns(run / "version_0" / "metrics.csv")
    assert "smd/angular_update/model.features.0.weight" in cols
    assert _smd_rows(run / "version_0" / "metrics.csv") >= 3


def test_fsdp2_sets_fully_shard_and_rejects_unsupported_models(tmp_path):
    with composed(["strategy=fsdp2"], tmp_path) as cfg:
        assert cfg.model.fully_shard is True
        assert cfg.strategy._target_.endswith("ModelParallelStrategy")
    with composed(["experiment=coco_maskrcnn_4x", "strategy=fsdp2"], tmp_path) as cfg:
        with pytest.raises(ConfigError, match="strategy=fsdp2.*MaskRCNNModule"):
            train(cfg)


def test_fsdp1_compose_and_cpu_error(tmp_path):
    with composed(["experiment=imagenet_resnet50_goyal", "strategy=fsdp"], tmp_path) as cfg:
        assert cfg.strategy._target_ == "pytorch_lightning.strategies.FSDPStrategy"
        assert cfg.strategy.use_orig_params is True
    with composed(["strategy=fsdp", "trainer.accelerator=cpu"], tmp_path) as cfg:
        with pytest.raises(ConfigError, match="needs CUDA"):
            train(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 (FSDPStrategy) needs CUDA")
@pytest.mark.gpu
def test_fsdp1_fit_on_gpu(tmp_path):
    with composed([*TINY, "experiment=quickstart", "strategy=fsdp", "trainer.accelerator=gpu"], tmp_path) as cfg:
        result = train(cfg)
    assert "smd/angular_update/model.features.0.weight" in metrics_columns(result["metrics_csv"])


def test_deepspeed_compose_and_clear_error(tmp_path):
    with composed(["strategy=deepspeed"], tmp_path) as cfg:
        assert cfg.strategy._target_ == "pytorch_lightning.strategies.DeepSpeedStrategy"
        assert cfg.strategy.stage == 2
        if importlib.util.find_spec("deepspeed") is None:
            with pytest.raises(ConfigError, match="pip install deepspeed"):
                train(cfg)


def test_ddp_and_trainer_knobs_compose(tmp_path):
    with composed(["experiment=coco_maskrcnn_4x", "trainer.num_nodes=2", "trainer.precision=bf16-mixed"],
                  tmp_path) as cfg:
        assert cfg.strategy._target_ == "pytorch_lightning.strategies.DDPStrategy"
        assert cfg.trainer.sync_batchnorm is True and cfg.trainer.num_nodes == 2
        assert cfg.trainer.precision == "bf16-mixed"


def test_submitit_slurm_launcher_config(tmp_path):
    overrides = ["hydra/launcher=slurm", "experiment=imagenet_resnet50_goyal", "trainer.num_nodes=2",
                 "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60"]
    with composed(overrides, tmp_path) as cfg:
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
        assert launcher.nodes == 2 and launcher.tasks_per_node == 8 and launcher.gpus_per_node == 8
        assert launcher.partition == "gpu" and launcher.timeout_min == 60
        from examples.train import build_plugins
        from pytorch_lightning.plugins.environments import SLURMEnvironment

        (plugin,) = build_plugins(cfg)
        assert isinstance(plugin, SLURMEnvironment) and plugin.auto_requeue is False
