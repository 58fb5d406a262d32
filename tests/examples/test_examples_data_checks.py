"""Data checked before the model is built (issue 27): every case a new user met on datasets in the
official on-disk formats (written here) fails with one message naming the config key, the path and
the fix, before any model, process group or Trainer exists."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest

from tests.examples_fixtures import make_cifar10, make_coco, make_image_folder

from examples.data import (
    CIFAR10DataModule,
    COCODataModule,
    DatasetError,
    DigitsDataModule,
    ImageNetDataModule,
    MarkovSequenceDataModule,
)
from examples.data.common import loader_kwargs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

WNIDS = ("n01440764", "n01443537", "n01484850")


def _raises(check, *needles):
    with pytest.raises(DatasetError) as err:
        check()
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


# --- CIFAR-10 (python-2 pickles) -------------------------------------------------------------


def test_cifar_batch_larger_than_training_set(tmp_path):
    """Why 1: 250 images, batch 256, drop_last: Lightning trained nothing and exited 0."""
    make_cifar10(tmp_path, n_per_batch=50)  # 5 × 50 = 250 training images
    dm = CIFAR10DataModule(root=str(tmp_path), verify=False, batch_size=256, num_classes=10)
    _raises(dm.check, "data.batch_size=256", "250 training samples", "data.batch_size=250", "cifar-10-batches-py")
    CIFAR10DataModule(root=str(tmp_path), verify=False, batch_size=250).check()
    _raises(lambda: CIFAR10DataModule(root=str(tmp_path), verify=False, batch_size=128).check(world_size=2),
            "125 training samples per process")


@pytest.mark.parametrize("damage", ["truncated", "not_a_dict", "wrong_shape", "bad_label"])
def test_cifar_damaged_batch_file(tmp_path, damage):
    folder = make_cifar10(tmp_path, n_per_batch=8) / "cifar-10-batches-py"
    path = folder / "data_batch_3"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:500])
        needle = "cannot be read"
    else:
        entry = pickle.loads(path.read_bytes(), encoding="latin1")
        if damage == "not_a_dict":
            entry, needle = [entry["data"]], "no 'data'"
        elif damage == "wrong_shape":
            entry["data"], needle = entry["data"].reshape(8, 3, 32, 32), "expected uint8 [N, 3072]"
        else:
            entry["labels"][0], needle = 10, "labels outside [0, 10)"
        path.write_bytes(pickle.dumps(entry, protocol=2))
    _raises(CIFAR10DataModule(root=str(tmp_path), verify=False, batch_size=4).check, str(path.resolve()),
            "data.root", needle, "cifar-10-python.tar.gz")


def test_cifar_num_classes_against_meta(tmp_path):
    make_cifar10(tmp_path, n_per_batch=8)
    _raises(CIFAR10DataModule(root=str(tmp_path), verify=False, batch_size=4, num_classes=100).check,
            "data.num_classes=100", "10 label_names", "Set data.num_classes=10")


# --- ImageNet (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) ----------------------------------------


def test_imagenet_val_lacking_a_class(tmp_path):
    """Why 2: val/ without one of train/'s classes trained with every validation label shifted."""
    make_image_folder(tmp_path, classes=WNIDS, per_class=2)
    shutil.rmtree(tmp_path / "val" / WNIDS[1])
    _raises(ImageNetDataModule(root=str(tmp_path), batch_size=2, num_classes=3).check,
            "differ", f"{WNIDS[1]} only in train/", "data.root", "shifted")


@pytest.mark.parametrize("num_classes", [1000, 2])
def test_imagenet_num_classes_against_folders(tmp_path, num_classes):
    """Why 2: 1000 (the default) trained a 1000-way head on 3 folders; 2 died in the sanity check."""
    make_image_folder(tmp_path, classes=WNIDS, per_class=2)
    _raises(ImageNetDataModule(root=str(tmp_path), batch_size=2, num_classes=num_classes).check,
            f"data.num_classes={num_classes}", "3 class folders", "Set data.num_classes=3", str(tmp_path / "train"))
    ImageNetDataModule(root=str(tmp_path), batch_size=2, num_classes=3).check()


def test_imagenet_flat_val_gets_valprep_hint(tmp_path):
    """Why 3: the raw ILSVRC val/ (flat JPEGs) gave a 41-line FileNotFoundError."""
    make_image_folder(tmp_path, classes=WNIDS, per_class=2)
    for d in (tmp_path / "val").iterdir():
        for f in d.iterdir():
            f.rename(tmp_path / "val" / f"ILSVRC2012_val_{f.stem}.JPEG")
        d.rmdir()
    _raises(ImageNetDataModule(root=str(tmp_path), batch_size=2).check, "no class folders", "6 images directly",
            "valprep.sh", str(tmp_path / "val"))


def test_imagenet_empty_class_folder_and_small_batch(tmp_path):
    make_image_folder(tmp_path, classes=WNIDS, per_class=2)
    (tmp_path / "train" / "n09999999").mkdir()
    (tmp_path / "val" / "n09999999").mkdir()
    _raises(ImageNetDataModule(root=str(tmp_path), batch_size=2).check, "without an image", "n09999999")
    shutil.rmtree(tmp_path / "train" / "n09999999")
    shutil.rmtree(tmp_path / "val" / "n09999999")
    _raises(ImageNetDataModule(root=str(tmp_path), batch_size=32, num_classes=3).check, "data.batch_size=32",
            "6 training samples")


# --- COCO 2017 (train2017/, val2017/, annotations/instances_*2017.json) ------------------------


def test_coco_truncated_annotation_file(tmp_path):
    """Why 3: a truncated json failed after the model and process group were built, naming neither
    the file nor data.train_ann."""
    make_coco(tmp_path, unannotated=True)
    ann = tmp_path / "annotations" / "instances_train2017.json"
    ann.write_text(ann.read_text()[:300])
    _raises(COCODataModule(root=str(tmp_path), batch_size=1).check, str(ann.resolve()), "data.train_ann",
            "JSONDecodeError", "annotations_trainval2017.zip")


@pytest.mark.parametrize("damage,needle", [
    ("list", "not an object"),
    ("no_images", "'images'"),
    ("ann_without_bbox", "annotations[0] lacks"),
    ("unknown_image", "refers to image 99"),
])
def test_coco_wrongly_shaped_annotation_file(tmp_path, damage, needle):
    make_coco(tmp_path)
    ann = tmp_path / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    if damage == "list":
        data = data["annotations"]
    elif damage == "no_images":
        del data["images"]
    elif damage == "ann_without_bbox":
        del data["annotations"][0]["bbox"]
    else:
        data["annotations"][0]["image_id"] = 99
    ann.write_text(json.dumps(data))
    _raises(COCODataModule(root=str(tmp_path), batch_size=1).check, "data.val_ann", needle, str(ann.resolve()))


def test_coco_listed_image_absent_on_disk(tmp_path):
    make_coco(tmp_path, unannotated=True)
    (tmp_path / "train2017" / f"{2:012d}.jpg").unlink()
    _raises(COCODataModule(root=str(tmp_path), batch_size=1).check, "1 of the 5 images", f"{2:012d}.jpg",
            "data.train_images", "train2017.zip")


def test_coco_categories_and_num_classes(tmp_path):
    make_coco(tmp_path, unannotated=True)
    _raises(COCODataModule(root=str(tmp_path), batch_size=1, num_classes=3).check, "data.num_classes=3",
            "category ids up to 3", "data.num_classes=4")
    ann = tmp_path / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["categories"].append({"id": 7, "name": "train", "supercategory": "vehicle"})
    ann.write_text(json.dumps(data))
    _raises(COCODataModule(root=str(tmp_path), batch_size=1, num_classes=91).check, "categories differ",
            "data.val_ann")


def test_coco_check_parses_once_and_batch_fits(tmp_path):
    """The json parsed by check() is the one the dataset uses; the batch must fit the images with a box."""
    make_coco(tmp_path, n_train=3, unannotated=True)  # 2 train images with a usable box
    _raises(COCODataModule(root=str(tmp_path), batch_size=3).check, "data.batch_size=3", "2 training samples")
    dm = COCODataModule(root=str(tmp_path), batch_size=2, num_classes=91, num_workers=0)
    dm.check()
    parsed = dm.annotations["train"]
    (tmp_path / "annotations" / "instances_train2017.json").unlink()  # setup() must not read it again
    dm.setup("fit")
    assert dm.train_set.coco.dataset is parsed and len(dm.train_set) == 2 and len(dm.val_set) == 3


# --- the others, and the loader defaults -----------------------------------------------------


def test_generated_datasets_check_the_batch():
    _raises(DigitsDataModule(batch_size=2000).check, "data.batch_size=2000", "1438 training samples")
    _raises(MarkovSequenceDataModule(train_sequences=16, batch_size=32).check, "data.batch_size=32")


def test_loader_defaults_follow_the_machine(monkeypatch):
    """Why 7: 4/8 workers on 2 cores and pin_memory without an accelerator."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    kwargs = loader_kwargs(None, None)
    assert kwargs["num_workers"] == 1 and kwargs["persistent_workers"] is True
    assert kwargs["pin_memory"] is __import__("torch").cuda.is_available()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert loader_kwargs(None, False)["num_workers"] == 8
    assert loader_kwargs(0, True) == {"num_workers": 0, "pin_memory": True, "persistent_workers": False}


def test_checks_are_cheap_on_many_images(tmp_path):
    """No image is opened: 3 × 200 empty 'JPEGs' check in well under a second."""
    import time

    for split in ("train", "val"):
        for c in WNIDS:
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(200):
                (d / f"{i}.JPEG").write_bytes(b"")
    start = time.perf_counter()
    ImageNetDataModule(root=str(tmp_path), batch_size=32, num_classes=3).check()
    assert time.perf_counter() - start < 1.0


