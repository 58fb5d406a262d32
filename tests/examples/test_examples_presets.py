"""The paper presets as users run them (issue 27): the README's "Where each preset runs" table is
composed cell by cell (CPU, one GPU, one 8-GPU node, SLURM with the sbatch script submitit would
write, rendered offline), a machine without the preset's GPUs is refused before Lightning starts,
naming the overrides, and (slow) the CPU column trains on tiny data in the official formats."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.examples_fixtures import ROOT, TINY, TRAIN_PY, composed, make_cifar10, make_coco, make_image_folder, subprocess_env

from examples.train import train
from examples.validate import ConfigError, validate_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*",
                                        "ignore:.*does not have many workers.*")

COLUMNS = ("cpu", "gpu", "node", "slurm")


def preset_table() -> dict[str, dict[str, list[str]]]:
    """README's preset table: preset → column → the overrides it lists."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("<!-- preset-table"):]
    rows = {}
    for line in section.splitlines()[3:]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        preset = cells[0].strip("`")
        rows[preset] = {col: [] if cell == "`(none)`" else shlex.split(cell.strip("`"))
                        for col, cell in zip(COLUMNS, cells[2:])}
    return rows


TABLE = preset_table()


def test_table_lists_every_paper_preset():
    presets = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")
                     if p.stem.startswith(("cifar10", "imagenet", "coco", "mobilenet")) and not p.stem.endswith("_rescale"))
    assert sorted(TABLE) == presets


def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize("preset", ["imagenet_resnet50_goyal", "coco_maskrcnn_4x",
                                    pytest.param("mobilenet_v2_imagenet", marks=pytest.mark.slow),
                                    pytest.param("imagenet_resnet50_sgd_fixed_rescale", marks=pytest.mark.slow)])
def test_gpu_preset_on_a_cpu_machine_names_the_overrides(tmp_path, monkeypatch, preset):
    """Why 4: on a CPU machine the README commands died in Lightning ('No supported gpu backend found!')."""
    _no_gpu(monkeypatch)
    with composed([f"experiment={preset}"], tmp_path) as cfg:
        with pytest.raises(ConfigError) as err:
            validate_config(cfg)
    msg = str(err.value)
    base = preset.removesuffix("_rescale")
    assert f"experiment={preset} runs on CUDA GPUs" in msg and "this machine has none" in msg
    assert "On the CPU add: " + " ".join(TABLE[base]["cpu"]) in msg
    assert "On one GPU add: trainer.accelerator=gpu " + " ".join(TABLE[base]["gpu"]) in msg


def test_too_few_gpus_and_sync_batchnorm_on_cpu(tmp_path, monkeypatch):
    """Why 4: the COCO preset on CPU died in its first forward with 'SyncBatchNorm layers only work
    with GPU modules'; 8 devices on a 2-GPU machine is refused before Lightning too."""
    _no_gpu(monkeypatch)
    with composed(["experiment=coco_maskrcnn_4x", "trainer.accelerator=cpu", "trainer.devices=1"], tmp_path) as cfg:
        with pytest.raises(ConfigError, match="trainer.sync_batchnorm=true needs CUDA GPUs.*trainer.sync_batchnorm=false"):
            validate_config(cfg)
    _gpus(monkeypatch, 2)
    with composed(["experiment=imagenet_resnet50_goyal"], tmp_path) as cfg:
        with pytest.raises(ConfigError, match="trainer.devices=8 GPUs per node and this machine has 2: set trainer.devices=2"):
            validate_config(cfg)


def _sbatch(cfg, sweep_dir: Path, monkeypatch) -> str:
    """The sbatch script hydra-submitit-launcher would submit for ``cfg``: the real launcher's
    ``launch`` with submitit's ``map_array`` replaced by a renderer (no SLURM needed)."""
    import shutil

    import submitit
    from hydra.utils import instantiate

    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda n, *a, **k: f"/usr/bin/{n}" if n in ("srun", "sbatch") else which(n, *a, **k))
    scripts = []

    def render(executor, fn, *args):
        scripts.append(executor._executor._make_submission_file_text("python -u -m submitit.core._submit X", "0"))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", render)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    launcher.launch([["experiment=x"]], 0)
    return scripts[0]


@pytest.mark.parametrize("preset", [p if p == "coco_maskrcnn_4x" else pytest.param(p, marks=pytest.mark.slow)
                                    for p in sorted(TABLE)])  # ~5 s each on 2 busy cores: COCO in the default run
def test_every_table_cell_composes_and_validates(tmp_path, monkeypatch, preset):
    """Every README command composes with its defaults, resolves fully and passes the checks on the
    machine it is written for; the SLURM one also renders its sbatch script (Why 6: devices=auto,
    the schema deprecation warning, COCO's LR and schedule at 2 nodes)."""
    for column, overrides in TABLE[preset].items():
        args = list(overrides)
        if column == "cpu":
            _no_gpu(monkeypatch)
        else:
            _gpus(monkeypatch, 1 if column == "gpu" else 8)
        if column == "slurm":
            monkeypatch.setenv("SLURM_JOB_ID", "1")
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # Hydra's schema-shadowing deprecation is a UserWarning
            with composed([f"experiment={preset}", f"data.root={tmp_path}", *args, f"hydra.sweep.dir={tmp_path / 'sw'}"],
                          tmp_path / "run") as cfg:
                resolved = OmegaConf.to_container(cfg, resolve=True)
                validate_config(cfg)
                t = resolved["trainer"]
                batch = resolved["data"]["batch_size"] * (t["devices"] if isinstance(t["devices"], int) else 1) * t["num_nodes"]
                if preset == "imagenet_resnet50_goyal":
                    assert resolved["optimizer"]["lr"] == pytest.approx(0.1 * batch / 256)
                if preset == "coco_maskrcnn_4x":  # Detectron2's scaling: η ∝ B, iterations ∝ 1/B
                    assert resolved["optimizer"]["lr"] == pytest.approx(0.02 * batch / 16)
                    assert t["max_steps"] == 360000 * 16 // batch
                    assert resolved["scheduler"]["milestones"] == [300000 * 16 // batch, 340000 * 16 // batch]
                    assert resolved["scheduler"]["warmup_steps"] == 1000 * 16 // batch
                if column == "slurm":
                    script = _sbatch(cfg, tmp_path / "sw", monkeypatch)
                    devices = t["devices"]
                    assert f"#SBATCH --nodes={t['num_nodes']}" in script
                    assert f"#SBATCH --ntasks-per-node={devices}" in script and f"#SBATCH --gpus-per-node={devices}" in script
                    assert "#SBATCH --partition=gpu" in script and "srun --unbuffered" in script
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_slurm_refuses_devices_auto_naming_the_key(tmp_path):
    """Why 6: without trainer.devices the launcher failed with a raw InterpolationValidationError."""
    with composed(["hydra/launcher=slurm", "trainer.num_nodes=2"], tmp_path) as cfg:
        with pytest.raises(Exception, match="trainer.devices=<GPUs per node>") as err:
            OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert "hydra.launcher.gpus_per_node" in str(err.value)


# --- slow: the commands as a user runs them -------------------------------------------------


@pytest.mark.slow
def test_documented_multinode_commands_compose_on_the_cli(tmp_path):
    """Every documented multi-node command (README table's SLURM column, the torchrun line) composed
    by the CLI itself (`--cfg all --resolve`; Hydra refuses `--cfg` together with `-m`): exit 0, no
    Hydra deprecation warning, the launcher's nodes and tasks from the trainer, COCO's LR scaled."""
    commands = [["experiment=coco_maskrcnn_4x", *TABLE["coco_maskrcnn_4x"]["slurm"]]]  # ~10-40 s per process:
    # the other SLURM cells are composed in-process by test_every_table_cell_composes_and_validates
    for args in commands:
        cmd = [sys.executable, str(TRAIN_PY), *args, f"data.root={tmp_path}", "--cfg", "all", "--resolve"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "deprecated" not in proc.stderr.lower(), proc.stderr
        assert "\n  num_nodes: 2\n" in proc.stdout
        if "hydra/launcher=slurm" in args:
            assert "\n    nodes: 2\n" in proc.stdout and "\n    tasks_per_node: 8\n" in proc.stdout
        if "experiment=coco_maskrcnn_4x" in args:
            assert "\n  lr: 0.04\n" in proc.stdout and "\n  max_steps: 180000\n" in proc.stdout


def _tiny_data(preset: str, root: Path) -> list[str]:
    """Data in the official format for ``preset`` under ``root``, and the overrides that make the
    run seconds long (sizes and steps only: the README's CPU overrides are kept as written)."""
    if preset.startswith("cifar10"):
        make_cifar10(root, n_per_batch=10)
        return ["data.verify=false", "data.batch_size=8"]
    if preset.startswith(("imagenet", "mobilenet")):
        make_image_folder(root, per_class=4, size=(40, 40))
        return ["data.num_classes=3", "data.batch_size=2", "data.image_size=32"]
    make_coco(root, n_train=7, n_val=2, size=(64, 48), unannotated=True)
    return ["data.batch_size=1", "model.min_size=64", "model.max_size=96", "trainer.max_steps=6"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["cifar10_resnet18_sgd", "imagenet_resnet50_goyal", "mobilenet_v2_imagenet",
                                    "coco_maskrcnn_4x"])  # the fixed-LR ImageNet presets: goyal's model and data
def test_cpu_form_trains_on_official_formats(tmp_path, preset):
    """The README's CPU form of each preset trains and logs smd/* on tiny data in the official format
    (6 steps: detection of the scale-invariant tensors takes the first 4)."""
    overrides = [f"experiment={preset}", f"data.root={tmp_path / 'data'}", *TABLE[preset]["cpu"],
                 *_tiny_data(preset, tmp_path / "data"), *TINY]
    overrides = [o for o in overrides if o not in ("trainer.devices=1",)] + ["trainer.devices=1"]
    with composed(overrides, tmp_path / "run") as cfg:
        result = train(cfg)
    assert result["global_step"] == 6
    header = Path(result["metrics_csv"]).read_text().splitlines()[0]
    assert re.search(r"smd/angular_update/", header), header[:500]


@pytest.mark.slow
def test_cli_batch_larger_than_training_set_exits_2(tmp_path):
    """Why 1: the 250-image copy at batch 256 exited 0 having trained nothing; now exit 2, one message."""
    make_cifar10(tmp_path / "c", n_per_batch=50)
    cmd = [sys.executable, str(TRAIN_PY), "experiment=cifar10_resnet18_sgd", f"data.root={tmp_path / 'c'}",
           "data.verify=false", "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path / 'run'}", "print_config=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data.batch_size=256 is larger than the 250 training samples" in proc.stderr
    assert "Traceback" not in proc.stderr
