"""The Hydra configs of conf/: every preset composes to the published settings, and bad
values fail before training with a message that names the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.examples_fixtures import CONF_DIR, TRAIN_PY, composed, subprocess_env

from examples.resolvers import linear_lr, linear_steps, slurm_devices, wandb_offline_default
from examples.train import build_module, train
from examples.validate import ConfigError

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
#: presets without SMD (homogeneous networks, no weight decay: no rescale variant)
HOMOGENEOUS = {"margin_digits", "ewn_vs_swn"}

# experiment -> (lr, momentum, weight_decay, milestones, gamma, interval, max_epochs, max_steps)
PUBLISHED = {
    "imagenet_resnet50_goyal": (0.1, 0.9, 1e-4, [30, 60, 80], 0.1, "epoch", 90, -1),
    "imagenet_resnet50_sgd_fixed": (0.2, 0.0, 1e-4, None, None, "epoch", 90, -1),
    "imagenet_resnet50_sgdm_fixed": (0.2, 0.9, 1e-4, None, None, "epoch", 90, -1),
    "coco_maskrcnn_4x": (0.02, 0.9, 1e-4, [300000, 340000], 0.1, "step", -1, 360000),
    "cifar10_resnet18_sgd": (0.5, 0.0, 1e-3, [60, 120, 160], 0.2, "epoch", 200, -1),
    "mobilenet_v2_imagenet": (0.5, 0.9, 4e-5, [30, 60, 80], 0.1, "epoch", 90, -1),
}


def test_every_experiment_has_a_rescale_variant():
    base = [e for e in EXPERIMENTS if not e.endswith("_rescale") and e not in HOMOGENEOUS]
    assert {"quickstart", *PUBLISHED} <= set(base)
    for name in base:
        assert f"{name}_rescale" in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_resolves_and_builds_optimizer(tmp_path, name):
    with composed([f"experiment={name}"], tmp_path) as cfg:
        if name in HOMOGENEOUS:
            assert cfg.smd.enabled is False and cfg.optimizer.weight_decay == 0.0
        else:
            assert cfg.smd._target_ == "lightning_smd.SMDCallback"
            assert cfg.smd.rescale is name.endswith("_rescale")
        assert cfg.task_name == name
        from omegaconf import OmegaConf

        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        if name.startswith(("imagenet", "coco", "mobilenet")):
            return  # big models: composing is enough here (test_examples_train fits them)
        module = build_module(cfg)
        opt = module.configure_optimizers()
        opt = opt["optimizer"] if isinstance(opt, dict) else opt
        assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("rescale", [False, True])
def test_published_settings(tmp_path, name, rescale):
    lr, mom, wd, milestones, gamma, interval, epochs, steps = PUBLISHED[name]
    with composed([f"experiment={name}{'_rescale' if rescale else ''}"], tmp_path) as cfg:
        assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer._partial_
        assert cfg.optimizer.lr == pytest.approx(lr)
        assert cfg.optimizer.momentum == mom and cfg.optimizer.weight_decay == pytest.approx(wd)
        assert cfg.scheduler.get("milestones") == milestones if milestones else "_target_" not in cfg.scheduler
        if gamma:
            assert cfg.scheduler.gamma == pytest.approx(gamma) and cfg.scheduler.interval == interval
        assert cfg.trainer.max_epochs == epochs and cfg.trainer.max_steps == steps
        assert cfg.smd.rescale is rescale
        assert cfg.model.get("norm_weight_decay") is None  # same wd everywhere, as in the papers


def test_goyal_linear_scaling_and_maskrcnn_syncbn(tmp_path):
    with composed(["experiment=imagenet_resnet50_goyal", "trainer.devices=4", "trainer.num_nodes=4",
                   "data.batch_size=64"], tmp_path) as cfg:
        assert cfg.optimizer.lr == pytest.approx(0.1 * 4 * 4 * 64 / 256)
    with composed(["experiment=coco_maskrcnn_4x"], tmp_path) as cfg:
        assert cfg.trainer.sync_batchnorm is True
        assert cfg.data.batch_size * cfg.trainer.devices == 16
        assert cfg.model._target_ == "examples.modules.MaskRCNNModule"
    with composed(["experiment=cifar10_resnet18_sgd"], tmp_path) as cfg:
        assert cfg.data.batch_size == 256 and cfg.model.arch == "resnet18_cifar"


def test_resolvers():
    assert linear_lr(0.1, 256, 32, 8, 1) == pytest.approx(0.1)
    assert linear_lr(0.1, 256, 32, [0, 1], 2, 2) == pytest.approx(0.1)
    assert linear_lr(0.1, 256, 32, "auto", 1, 1, "cpu") == pytest.approx(0.0125)  # auto on CPU: 1 process
    assert linear_steps(360000, 16, 2, 8, 2) == 180000 and linear_steps(1000, 16, 2, 1, 1) == 8000
    with pytest.raises(ValueError, match="trainer.devices=<GPUs per node>"):
        slurm_devices("auto")


def test_wandb_offline_default(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_offline_default() is True
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_offline_default() is False
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_offline_default() is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline_default() is True
    with composed(["logger=wandb", "logger.wandb.entity=me", "tags=[a,b]"], tmp_path) as cfg:
        assert cfg.logger.wandb.offline is True
        assert cfg.logger.wandb.tags == ["a", "b"] and cfg.logger.wandb.entity == "me"
        assert cfg.logger.csv._target_.endswith("CSVLogger")


@pytest.mark.parametrize("override,match", [
    ("optimizer.lr=0", "optimizer.lr must be a number > 0"),
    ("optimizer.lr=-0.1", "optimizer.lr must be a number > 0"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
    ("optimizer.momentum=1.5", "optimizer.momentum"),
    ("scheduler.milestones=[20,10]", "scheduler.milestones"),
    ("scheduler.interval=batch", "scheduler.interval"),
    ("smd.rescale=sometimes", "smd.rescale"),
    ("smd.log_every_n_steps=0", "smd.log_every_n_steps"),
    ("model.norm_weight_decay=-1", "model.norm_weight_decay"),
])
def test_bad_values_fail_before_training(tmp_path, override, match):
    with composed(["experiment=quickstart", override], tmp_path / "run") as cfg:
        with pytest.raises(ConfigError, match=match):
            train(cfg)
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_devices_auto_resolves_like_lightning(tmp_path):
    """Issue 27: ``trainer.devices=auto`` resolves (CPU: one process) instead of failing in linear_lr."""
    with composed(["experiment=imagenet_resnet50_goyal", "trainer.devices=auto", "trainer.accelerator=cpu"],
                  tmp_path) as cfg:
        assert cfg.optimizer.lr == pytest.approx(0.1 * 32 / 256)


def test_norm_weight_decay_param_groups(tmp_path):
    with composed(["experiment=quickstart", "model.norm_weight_decay=0.0"], tmp_path) as cfg:
        opt = build_module(cfg).configure_optimizers()["optimizer"]
    names = [g["name"] for g in opt.param_groups]
    assert names == ["all", "norm"]
    assert opt.param_groups[1]["weight_decay"] == 0.0 and len(opt.param_groups[1]["params"]) == 6
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(5e-3)


def test_head_weight_decay_param_group(tmp_path):
    """``model.head_weight_decay`` gives the output head's weight (the last nn.Linear) its own group."""
    with composed(["experiment=quickstart", "model.head_weight_decay=0.0"], tmp_path) as cfg:
        module = build_module(cfg)
        opt = module.configure_optimizers()["optimizer"]
    head = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["all", "head"] and groups["head"]["weight_decay"] == 0.0
    assert {id(p) for p in groups["head"]["params"]} == {id(head.weight), id(head.bias)}
    assert not {id(p) for p in groups["all"]["params"]} & {id(head.weight), id(head.bias)}


@pytest.mark.slow  # over 7 s on 2 cores
def test_cli_missing_dataset_exits_with_hint(tmp_path):
    """The CLI fails before training, says where it looked and which key to set."""
    cmd = [sys.executable, str(TRAIN_PY), "experiment=cifar10_resnet18_sgd", f"data.root={tmp_path / 'none'}",
           f"hydra.run.dir={tmp_path / 'run'}", "print_config=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "none/cifar-10-batches-py" in proc.stderr and "data.root=" in proc.stderr
    assert "data.download=true" in proc.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.slow  # over 7 s on 2 cores
def test_cli_unknown_model_is_a_hydra_error(tmp_path):
    cmd = [sys.executable, str(TRAIN_PY), "model=resnet1000", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'model/resnet1000'" in proc.stderr and "digits_cnn" in proc.stderr

