"""Shared helpers of tests/test_examples_*.py: tiny datasets in the real on-disk formats and
composition of the Hydra configs of ``conf/`` (as lightning-hydra-template's tests do)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
TRAIN_PY = ROOT / "examples" / "train.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Overrides that make any config a seconds-long CPU run.
TINY = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_checkpointing=false",
    "trainer.enable_model_summary=false",
    "smd.log_every_n_steps=1",
    "smd.verbose=false",
    "print_config=false",
]


@contextlib.contextmanager
def composed(overrides: Sequence[str], run_dir: str | Path) -> Iterator:
    """Compose ``conf/config.yaml`` with ``overrides`` and make ``${hydra:...}`` resolvable.

    ``run_dir`` becomes the Hydra output dir (``paths.output_dir``). HydraConfig is reset on exit.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import examples.resolvers  # noqa: F401  (resolvers used by the configs)

    run_dir = Path(run_dir)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
        cfg.hydra.job.id = "test"
    HydraConfig.instance().set_config(cfg)
    try:
        yield cfg
    finally:
        HydraConfig.instance().cfg = None


def subprocess_env() -> dict[str, str]:
    """Environment of an ``examples/train.py`` subprocess: repo importable, offline W&B, 1 thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["WANDB_MODE"] = "offline"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("LOCAL_RANK", None)
    return env


def metrics_columns(csv_path: str | Path) -> list[str]:
    """Header of a Lightning ``metrics.csv``."""
    with open(csv_path) as f:
        return f.readline().strip().split(",")


# --- datasets in their real formats ---------------------------------------------------------


def make_cifar10(root: str | Path, n_per_batch: int = 8, seed: int = 0) -> Path:
    """``<root>/cifar-10-batches-py`` with data_batch_1..5, test_batch, batches.meta pickles
    (uint8 [N, 3072] rows, R then G then B planes, ``labels`` lists) like the official files."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for name in names:
        entry = {
            "batch_label": f"{name} (generated)",
            "labels": rng.integers(0, 10, n_per_batch).tolist(),
            "data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png" for i in range(n_per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
            "num_cases_per_batch": n_per_batch, "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return Path(root)


def make_image_folder(root: str | Path, classes: Sequence[str] = ("n01440764", "n01443537", "n01484850"),
                      per_class: int = 3, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """ImageNet-style ``<root>/{train,val}/<wnid>/*.JPEG`` with random RGB JPEGs."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in classes:
            d = Path(root) / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{c}_{i}.JPEG", quality=90)
    return Path(root)


def _polygon_ann(ann_id: int, img_id: int, cat: int, x: float, y: float, w: float, h: float) -> dict:
    """A triangle-plus-rectangle polygon inside the box (x, y, w, h)."""
    poly = [x, y, x + w, y, x + w, y + h * 0.6, x + w * 0.5, y + h, x, y + h * 0.6]
    return {"id": ann_id, "image_id": img_id, "category_id": cat, "segmentation": [poly],
            "area": float(w * h * 0.8), "bbox": [x, y, w, h], "iscrowd": 0}


def make_coco(root: str | Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (64, 48),
              seed: int = 0, unannotated: bool = False) -> Path:
    """COCO layout: ``train2017/``, ``val2017/`` JPEGs and ``annotations/instances_*.json``.

    Each image has two polygon instances (category ids 1 and 3, sparse like COCO's); image 1
    of each split also has a crowd annotation (RLE) and a zero-width box, which the loader
    must skip; the last train image has only those two (dropped for training). With
    ``unannotated``, each split also lists one more image without any annotation (as COCO does).
    """
    rng = np.random.default_rng(seed)
    w, h = size
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(1, n + 1):
            fname = f"{i:012d}.jpg"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / fname)
            images.append({"id": i, "file_name": fname, "width": w, "height": h})
            only_bad = split == "train2017" and i == n
            if not only_bad:
                anns.append(_polygon_ann(ann_id, i, 1, 4.0, 5.0, 20.0, 16.0))
                anns.append(_polygon_ann(ann_id + 1, i, 3, 30.0, 20.0, 24.0, 20.0))
                ann_id += 2
            if i == 1 or only_bad:
                anns.append({"id": ann_id, "image_id": i, "category_id": 1, "iscrowd": 1, "area": 40.0,
                             "bbox": [10.0, 10.0, 8.0, 5.0],
                             "segmentation": {"size": [h, w], "counts": [h * 10 + 10, 5, h - 5, 5, w * h]}})
                anns.append({**_polygon_ann(ann_id + 1, i, 3, 40.0, 4.0, 0.0, 10.0), "area": 0.0})
                ann_id += 2
        if unannotated:
            fname = f"{n + 1:012d}.jpg"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / fname)
            images.append({"id": n + 1, "file_name": fname, "width": w, "height": h})
        # RLE counts must sum to h*w
        for a in anns:
            if a["iscrowd"]:
                counts = a["segmentation"]["counts"]
                counts[-1] = h * w - sum(counts[:-1])
        data = {"info": {"description": "generated"}, "licenses": [], "images": images, "annotations": anns,
                "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                               {"id": 2, "name": "bicycle", "supercategory": "vehicle"},
                               {"id": 3, "name": "car", "supercategory": "vehicle"}]}
        kind = split.replace("2017", "")
        with open(root / "annotations" / f"instances_{kind}2017.json", "w") as f:
            json.dump(data, f)
    return root
