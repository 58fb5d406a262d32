"""examples/train.py's train(cfg) on every model / data config, with generated data, on CPU."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest

from tests.examples_fixtures import TINY, composed, make_cifar10, make_coco, make_image_folder, metrics_columns

from examples.train import train

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning:pycocotools.*",
    "ignore:.*does not have many workers.*",
)


def _smd_tensors(csv_path: str) -> list[str]:
    prefix = "smd/angular_update/"
    return [c[len(prefix):] for c in metrics_columns(csv_path) if c.startswith(prefix)]


def _run(tmp_path: Path, overrides: list[str]) -> dict:
    run_dir = tmp_path / "run"
    with composed([*TINY, *overrides], run_dir) as cfg:
        return train(cfg)


def test_quickstart_short_run_writes_config_metrics_and_figures(tmp_path):
    result = _run(tmp_path, ["experiment=quickstart", "trainer.max_epochs=2", "trainer.limit_train_batches=6",
                             "scheduler.milestones=[1]", "trainer.limit_val_batches=null"])
    out = Path(result["output_dir"])
    assert result["global_step"] == 12
    assert (out / "config_resolved.yaml").is_file()
    assert Path(result["metrics_csv"]) == out / "version_0" / "metrics.csv"  # a fresh version folder
    tensors = _smd_tensors(result["metrics_csv"])
    assert tensors == ["model.features.0.weight", "model.features.3.weight", "model.features.7.weight"]
    assert "lr-SGD/all" in metrics_columns(result["metrics_csv"])
    assert Path(result["figures_dir"]) == out / "smd"
    assert any(p.suffix == ".png" for p in (out / "smd").iterdir())
    assert 0.0 <= result["metrics"]["val/acc"] <= 1.0


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_cifar10_resnet18(tmp_path):
    make_cifar10(tmp_path / "cifar", n_per_batch=4)
    result = _run(tmp_path, ["experiment=cifar10_resnet18_sgd", f"data.root={tmp_path / 'cifar'}",
                             "data.verify=false", "data.batch_size=4", "data.num_workers=0",
                             "data.pin_memory=false", "trainer.limit_train_batches=3",
                             "smd.detection.mode=structural"])
    assert result["global_step"] == 3
    tensors = _smd_tensors(result["metrics_csv"])
    assert "model.conv1.weight" in tensors and "model.layer4.1.conv2.weight" in tensors
    assert "model.fc.weight" not in tensors


@pytest.mark.parametrize("experiment,first", [
    ("imagenet_resnet50_goyal", "model.layer1.0.conv1.weight"),
    ("mobilenet_v2_imagenet", "model.features.0.0.weight"),
])
@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_imagenet_models(tmp_path, experiment, first):
    make_image_folder(tmp_path / "imagenet", per_class=2, size=(40, 40))
    result = _run(tmp_path, [f"experiment={experiment}", f"data.root={tmp_path / 'imagenet'}",
                             "strategy=single", "data.num_classes=3", "data.image_size=32",
                             "data.batch_size=2", "data.num_workers=0", "data.pin_memory=false",
                             "trainer.limit_train_batches=2", "smd.detection.mode=structural",
                             # one thread: the h̃ sample of mobilenet_v2 at lr 0.5 comes out slightly
                             # negative there, which once crashed the ‖w*‖ prediction
                             "torch_threads=1"])
    assert result["global_step"] == 2
    assert first in _smd_tensors(result["metrics_csv"])
    assert "val/acc" in result["metrics"]


@pytest.mark.slow
def test_coco_maskrcnn(tmp_path):
    make_coco(tmp_path / "coco", n_train=5, n_val=2)
    result = _run(tmp_path, ["experiment=coco_maskrcnn_4x", f"data.root={tmp_path / 'coco'}",
                             "strategy=single", "trainer.sync_batchnorm=false", "trainer.max_steps=2",
                             "trainer.check_val_every_n_epoch=1", "model.min_size=64", "model.max_size=64",
                             "data.batch_size=2", "data.num_workers=0", "data.pin_memory=false",
                             "scheduler.warmup_steps=1", "smd.detection.mode=structural"])
    assert result["global_step"] == 2  # 4 usable train images, batch 2, one epoch
    tensors = _smd_tensors(result["metrics_csv"])
    assert "model.backbone.body.conv1.weight" in tensors
    assert "model.roi_heads.mask_head.0.0.weight" in tensors
    assert not any(t.startswith("model.rpn.head.conv") for t in tensors)  # no norm after the RPN convs
    for key in ("val/bbox_map", "val/segm_map"):
        assert key in result["metrics"]


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_nrq_angular_update_matches_theory(tmp_path):
    """NRQ started at its equilibrium norm ‖X*‖⁴ = (p−1)σ²η/(2λ): Δ_t ≈ Δ* = sqrt(2λη) at once."""
    lr, wd, p, sigma = 0.1, 1e-3, 100, 1.0
    init_norm = ((p - 1) * sigma**2 * lr / (2 * wd)) ** 0.25
    result = _run(tmp_path, ["experiment=nrq_escape", "trainer.max_steps=60", "data.steps_per_epoch=60",
                             "trainer.limit_train_batches=null", "scheduler.milestones=[1000]",
                             "smd.log_every_n_steps=4", f"optimizer.lr={lr}", f"optimizer.weight_decay={wd}",
                             f"model.dim={p}", f"model.sigma={sigma}", f"model.init_norm={init_norm}"])
    assert result["global_step"] == 60
    assert _smd_tensors(result["metrics_csv"]) == ["X"]  # found numerically (no norm layer)
    with open(result["metrics_csv"]) as f:
        rows = [r for r in csv.DictReader(f) if r.get("smd/angular_update/X")]
    ratios = [float(r["smd/angular_update/X"]) / float(r["smd/angular_update_theory/X"]) for r in rows]
    assert float(rows[0]["smd/angular_update_theory/X"]) == pytest.approx(math.sqrt(2 * wd * lr))
    assert len(ratios) >= 10 and sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.1)
    assert "train/risk" in result["metrics"]


def _report_reads(out: Path, kind: str) -> None:
    """``python -m lightning_smd.report`` on the run dir picks ``kind`` and writes smd_report/."""
    from lightning_smd import report
    from lightning_smd.report.series import find_runs

    assert [r.kind for r in find_runs(out)] == [kind]
    assert report.main([str(out)]) == 0
    text = (out / "smd_report" / report.SUMMARY_FILE).read_text()
    assert "**3 scale-invariant tensors**" in text


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_tensorboard_logger(tmp_path):
    result = _run(tmp_path, ["experiment=quickstart", "logger=tensorboard"])
    out = Path(result["output_dir"])
    assert result["metrics_csv"] is None
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "smd").is_dir()
    _report_reads(out, "tensorboard")


@pytest.mark.slow  # ~6 s on 2 cores
def test_wandb_logger_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = _run(tmp_path, ["experiment=quickstart", "logger=wandb", "logger.wandb.project=smd-test",
                             "tags=[test]"])
    assert "WANDB_MODE" not in os.environ  # train() restores the env WandbLogger(offline=True) changed
    out = Path(result["output_dir"])
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert _smd_tensors(result["metrics_csv"])  # CSV logger rides along
    _report_reads(out, "csv")  # one run: CSV preferred
    _report_reads(out / "wandb", "wandb")  # the W&B run alone


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_quickstart_rescale_at_lr_drop(tmp_path):
    result = _run(tmp_path, ["experiment=quickstart_rescale", "trainer.max_epochs=2", "scheduler.milestones=[1]"])
    assert result["global_step"] == 12
    with open(result["metrics_csv"]) as f:
        factors = [float(r["smd/rescale_factor"]) for r in csv.DictReader(f) if r.get("smd/rescale_factor")]
    assert factors == [pytest.approx(10 ** -0.25, rel=1e-3)]
