"""Any classification model × any classification dataset composes and fits; tasks that do not
match, and unknown ``smd.*`` keys, fail in validation naming the keys."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.examples_fixtures import CONF_DIR, TINY, TRAIN_PY, composed, make_cifar10, make_image_folder, subprocess_env

from examples.modules.nets import build_adapted
from examples.train import build_module, train
from examples.validate import ConfigError, check_cli_overrides

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers.*")


def _task(group: str, name: str) -> str | None:
    return yaml.safe_load((CONF_DIR / group / f"{name}.yaml").read_text()).get("task")


def _options(group: str, task: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if _task(group, p.stem) == task)


MODELS = _options("model", "classification")
DATASETS = _options("data", "classification")


def test_every_config_declares_its_task_and_shape():
    assert MODELS == ["digits_cnn", "mobilenet_v2", "resnet18_cifar", "resnet50"]
    assert DATASETS == ["cifar10", "digits", "imagenet"]
    for name in DATASETS:
        cfg = yaml.safe_load((CONF_DIR / "data" / f"{name}.yaml").read_text())
        assert {"channels", "num_classes", "image_size"} <= set(cfg), name
    for name in MODELS:
        cfg = yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())
        assert cfg["num_classes"] == "${data.num_classes}"
        assert cfg["in_channels"] == "${data.channels}" and cfg["image_size"] == "${data.image_size}"


def _data_overrides(data: str, root: Path) -> list[str]:
    if data == "cifar10":
        make_cifar10(root / "cifar", n_per_batch=4)
        return [f"data.root={root / 'cifar'}", "data.verify=false", "data.num_workers=0", "data.pin_memory=false"]
    if data == "imagenet":
        make_image_folder(root / "imagenet", per_class=2, size=(72, 72))
        # 64 px: the ImageNet stem is kept (≥ 64), at a 12th of the cost of 224
        return [f"data.root={root / 'imagenet'}", "data.image_size=64", "data.num_workers=0",
                "data.pin_memory=false", "data.num_classes=3"]  # the class folders (checked before training)
    return []


# the default run keeps the digits CNN's row; the rest of the matrix (3-6 s each on 2 cores) is slow
_MATRIX = [pytest.param(m, d, marks=() if m == "digits_cnn" else pytest.mark.slow)
           for m in MODELS for d in DATASETS]


@pytest.mark.parametrize("model,data", _MATRIX)
def test_every_model_fits_every_classification_dataset(tmp_path, model, data):
    overrides = [*TINY, f"model={model}", f"data={data}", *_data_overrides(data, tmp_path),
                 "data.batch_size=2", "trainer.max_steps=2", "trainer.limit_train_batches=2",
                 "strategy=single", "smd.detection.mode=structural", "callbacks.lr_monitor=null"]
    with composed(overrides, tmp_path / "run") as cfg:
        result = train(cfg)
    assert result["global_step"] == 2
    assert "val/acc" in result["metrics"]


def _adaptation_lines(overrides: list[str], tmp_path: Path) -> list[str]:
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("pytorch_lightning")
    logger.addHandler(handler)
    try:
        with composed(overrides, tmp_path) as cfg:
            build_module(cfg)
    finally:
        logger.removeHandler(handler)
    return [line for line in lines if "adapted" in line]


def test_resnet50_on_digits_says_once_what_was_adapted(tmp_path):
    lines = _adaptation_lines(["model=resnet50"], tmp_path)
    assert len(lines) == 1
    assert "1×8×8" in lines[0] and "first conv takes 1 channel" in lines[0] and "small-image stem" in lines[0]
    lines = _adaptation_lines(["model=mobilenet_v2"], tmp_path)
    assert len(lines) == 1 and "upsampled 8→16 px" in lines[0]
    assert _adaptation_lines(["model=digits_cnn"], tmp_path) == []


def test_imagenet_and_cifar_networks_unchanged():
    stock, notes, _ = build_adapted("resnet50", 1000, in_channels=3, image_size=224)
    assert notes == [] and stock.conv1.kernel_size == (7, 7) and stock.conv1.stride == (2, 2)
    assert isinstance(stock.maxpool, torch.nn.MaxPool2d)
    mobile, notes, _ = build_adapted("mobilenet_v2", 1000, in_channels=3, image_size=224)
    assert notes == [] and mobile.features[0][0].stride == (2, 2)
    cifar, notes, _ = build_adapted("resnet18_cifar", 10, in_channels=3, image_size=32)
    assert notes == [] and cifar.conv1.kernel_size == (3, 3)
    small, notes, min_size = build_adapted("resnet50", 10, in_channels=1, image_size=8)
    assert small.conv1.in_channels == 1 and small.conv1.stride == (1, 1) and min_size == 8
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("model,data", [("maskrcnn", "digits"), ("maskrcnn", "imagenet"), ("digits_cnn", "coco"),
                                        ("resnet50", "nrq"), ("nrq", "cifar10")])
def test_model_and_data_of_different_tasks_are_refused(tmp_path, model, data):
    with composed([f"model={model}", f"data={data}"], tmp_path) as cfg:
        with pytest.raises(ConfigError, match=rf"model={model} \(model.task=\w+\) cannot train on data={data}"):
            train(cfg)


def test_unknown_smd_key_with_plus_fails_in_validation(tmp_path):
    with composed(["+smd.resclae=true"], tmp_path) as cfg:
        with pytest.raises(ConfigError, match=r"unknown key smd.resclae .*valid smd keys: .*, rescale, "):
            train(cfg)


def test_unknown_smd_key_on_the_command_line():
    with pytest.raises(ConfigError, match="smd.resclae"):
        check_cli_overrides(["model=resnet50", "smd.resclae=true"])
    with pytest.raises(ConfigError, match=r"smd.detection.stpes .*DetectionOptions.*valid: smd.detection.mode, "):
        check_cli_overrides(["smd.detection.stpes=5"])
    check_cli_overrides(["smd.rescale=true", "+smd.include=conv", "smd=off", "smd.detection.steps=5",
                         "smd.rescale.min_drop=4"])  # valid ones pass



def test_unknown_smd_key_exits_the_cli_before_hydra(monkeypatch, capsys):
    """The script's ``__main__`` path, run in this process (the modules are imported already)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [str(TRAIN_PY), "smd.resclae=true"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(TRAIN_PY), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown key smd.resclae" in err and ", detection, estimates, equilibrium" in err


@pytest.mark.slow
def test_design_card_command_runs(tmp_path):
    """`python examples/train.py model=resnet50 smd.rescale=true`, the project's card, shortened to 3
    epochs of 2 batches (6 steps) with the pairing's own schedule: the LR drop ÷10 lands at 2/3 of the
    run (epoch 2 = step 4), the rescale with it, both in the logs. The full command's accuracy
    (val/acc ≥ 0.9) is checked by `python docs/make_design_card_figure.py --check` (minutes, not CI)."""
    from lightning_smd.report.series import RunSeries

    with composed(["model=resnet50", "smd.rescale=true"], tmp_path / "composed") as cfg:
        assert cfg.trainer.max_epochs == 3 and list(cfg.scheduler.milestones) == [2]
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "model=resnet50", "smd.rescale=true",
                           "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
                           "smd.per_channel=false", f"hydra.run.dir={run}"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model resnet50 adapted to the data (1×8×8, 10 classes)" in proc.stdout
    assert "SMD: scale-invariant tensors" in proc.stdout
    assert (run / "version_0" / "hparams.yaml").is_file() and (run / "train.log").is_file()
    with (run / "version_0" / "metrics.csv").open(newline="") as handle:  # LearningRateMonitor, every step
        lr = {int(r["step"]): float(r["lr-SGD/all"]) for r in csv.DictReader(handle) if r.get("lr-SGD/all")}
    assert sorted(lr) == list(range(6))
    assert [lr[s] for s in range(6)] == pytest.approx([0.005] * 4 + [0.0005] * 2)
    series = RunSeries.from_csv(run / "version_0" / "metrics.csv")
    assert [step for step, _ in series.rescale_events] == [4]
    assert series.rescale_events[0][1] == pytest.approx(10 ** -0.25, rel=1e-3)
