"""DataModules of examples/ on tiny datasets generated in the real on-disk formats."""

from __future__ import annotations

import pytest
import torch

from tests.examples_fixtures import make_cifar10, make_coco, make_image_folder

from examples.data import (
    CIFAR10DataModule,
    COCODataModule,
    CocoInstances,
    DatasetNotFoundError,
    DigitsDataModule,
    ImageNetDataModule,
    StepIndexDataModule,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


def test_digits_split_and_shapes():
    dm = DigitsDataModule(batch_size=16, val_fraction=0.2)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert len(dm.val_set) == 359
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and y.dtype == torch.long
    assert abs(float(x.mean())) < 1.0


def test_cifar10_generated_pickles_load_with_verify_false(tmp_path):
    make_cifar10(tmp_path, n_per_batch=6)
    dm = CIFAR10DataModule(root=str(tmp_path), verify=False, batch_size=4, num_workers=0, pin_memory=False)
    dm.check()
    dm.setup("fit")
    assert len(dm.train_set) == 30 and len(dm.val_set) == 6
    assert dm.train_set.classes[0] == "airplane"
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)


def test_cifar10_verify_true_rejects_generated_copy_with_hint(tmp_path):
    make_cifar10(tmp_path, n_per_batch=2)
    dm = CIFAR10DataModule(root=str(tmp_path), verify=True)
    with pytest.raises(DatasetNotFoundError, match="data.verify=false"):
        dm.check()


def test_cifar10_missing_says_where_and_how(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError) as err:
        dm.check()
    msg = str(err.value)
    assert "nowhere/cifar-10-batches-py" in msg and "data.root=" in msg and "data.download=true" in msg


def test_imagenet_folder_transforms(tmp_path):
    make_image_folder(tmp_path, per_class=2, size=(50, 40))
    dm = ImageNetDataModule(root=str(tmp_path), image_size=32, batch_size=3, num_workers=0, pin_memory=False)
    dm.check()
    dm.setup("fit")
    assert dm.val_resize_size == round(32 * 256 / 224)
    assert len(dm.train_set.classes) == 3
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 32, 32)
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape[-2:] == (32, 32)


def test_imagenet_missing_split(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetNotFoundError, match="val"):
        ImageNetDataModule(root=str(tmp_path)).check()


def test_coco_targets_from_polygons_skip_crowd_and_degenerate(tmp_path):
    make_coco(tmp_path, n_train=3, n_val=2, size=(64, 48))
    ds = CocoInstances(tmp_path / "val2017", tmp_path / "annotations/instances_val2017.json")
    img, t = ds[0]  # image 1: 2 polygons + 1 crowd + 1 zero-width box
    assert img.shape == (3, 48, 64)
    assert t["labels"].tolist() == [1, 3]
    assert t["boxes"].tolist() == [[4.0, 5.0, 24.0, 21.0], [30.0, 20.0, 54.0, 40.0]]
    assert t["masks"].shape == (2, 48, 64) and t["masks"].dtype == torch.uint8
    # the polygon is rasterized inside its box
    ys, xs = torch.nonzero(t["masks"][0], as_tuple=True)
    assert xs.min() >= 3 and xs.max() <= 24 and ys.min() >= 4 and ys.max() <= 21
    assert 100 < int(t["masks"][0].sum()) <= 20 * 16
    train = CocoInstances(tmp_path / "train2017", tmp_path / "annotations/instances_train2017.json",
                          train=True, remove_empty=True)
    assert len(train) == 2  # the image with only crowd/degenerate annotations is dropped


def test_coco_flip_keeps_boxes_on_masks(tmp_path):
    make_coco(tmp_path, n_train=2, n_val=1)
    ds = CocoInstances(tmp_path / "train2017", tmp_path / "annotations/instances_train2017.json", train=True)
    torch.manual_seed(0)
    for _ in range(6):  # covers both flip outcomes
        _, t = ds[0]
        for box, mask in zip(t["boxes"], t["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box[0] - 1 <= xs.min() and xs.max() <= box[2] + 1


def test_coco_datamodule_collates_lists_and_checks_paths(tmp_path):
    make_coco(tmp_path)
    dm = COCODataModule(root=str(tmp_path), batch_size=2, num_workers=0, pin_memory=False)
    dm.check()
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, tuple) and len(images) == 2 and isinstance(targets[0], dict)
    with pytest.raises(DatasetNotFoundError, match="data.root"):
        COCODataModule(root=str(tmp_path / "missing")).check()


def test_step_index_datamodule():
    dl = StepIndexDataModule(steps_per_epoch=5).train_dataloader()
    assert [int(b[0]) for b in dl] == [0, 1, 2, 3, 4]
