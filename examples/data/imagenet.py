"""ImageNet (or any ImageFolder dataset) in the ``train/<class>/*.JPEG``, ``val/<class>/*`` layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS

from examples.data.common import DatasetError, check_batches, check_num_classes, loader_kwargs, require

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetDataModule(pl.LightningDataModule):
    """``torchvision.datasets.ImageFolder`` on ``<root>/train`` and ``<root>/val``.

    Train: RandomResizedCrop(image_size) + horizontal flip; val: Resize(val_resize_size) +
    CenterCrop(image_size) (224/256 by default, the torchvision reference recipe). The val
    folder must use class sub-folders like train (e.g. after the usual ``valprep.sh``).

    Args:
        root: dataset folder holding ``train/`` and ``val/``.
        image_size: crop size (224).
        val_resize_size: resize before the center crop; ``None`` = ``image_size·256/224``.
        batch_size: per-device batch size (Goyal et al.: 32 per GPU, 256 total).
        num_workers: loader workers; ``None``: the CPUs available per device, minus one (≤ 8).
        pin_memory: ``None``: pin when training on a CUDA device.
        num_classes: the model's classes (``data.num_classes``), checked against the class folders.
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        image_size: int = 224,
        val_resize_size: int | None = None,
        batch_size: int = 32,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.image_size = image_size
        self.val_resize_size = val_resize_size or int(round(image_size * 256 / 224))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.num_classes = num_classes
        self.train_set = self.val_set = None

    def check(self, world_size: int = 1) -> None:
        """Raise a clear error now (before the model is built) when a split folder is missing or flat
        (no class folders: the raw ILSVRC val/), a class folder holds no image, train and val have
        different classes (the labels would shift), ``num_classes`` differs from the class folders, or
        ``batch_size`` leaves no training batch. Lists directories only (one ``scandir`` per class,
        stopping at the first image; counting stops once one batch per process is found)."""
        hint = (
            "Point data.root=/path/to/imagenet holding train/<class>/*.JPEG and val/<class>/*.JPEG "
            "(ImageNet cannot be downloaded automatically)."
        )
        splits = [require(self.root / name, f"ImageNet {name} split", "data.root", hint) for name in ("train", "val")]
        train, val = _classes(splits[0], "train"), _classes(splits[1], "val")
        if list(train) != list(val):
            only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
            raise DatasetError(
                f"ImageNet train and val class folders differ under {self.root.resolve()} (data.root): "
                f"{_few(only_train)} only in train/, {_few(only_val)} only in val/. ImageFolder numbers the "
                "classes of each split in sorted order, so every validation label would be shifted. Give "
                "val/ the same <wnid>/ folders as train/ (an empty class needs at least one image)."
            )
        check_num_classes(self.num_classes, len(train), f"{self.root.resolve() / 'train'} (data.root)")
        need = self.batch_size * max(1, world_size)
        count = 0
        for folder in train.values():  # only as far as one batch per process
            with os.scandir(folder) as entries:
                count += sum(1 for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
            if count >= need:
                break
        check_batches(count, self.batch_size, world_size, f"{self.root.resolve() / 'train'} (data.root)")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        train_tf = T.Compose([T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip(), *norm])
        val_tf = T.Compose([T.Resize(self.val_resize_size), T.CenterCrop(self.image_size), *norm])
        self.train_set = torchvision.datasets.ImageFolder(str(self.root / "train"), transform=train_tf)
        self.val_set = torchvision.datasets.ImageFolder(str(self.root / "val"), transform=val_tf)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, drop_last=True,
                          **loader_kwargs(self.num_workers, self.pin_memory, self.trainer))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, shuffle=False,
                          **loader_kwargs(self.num_workers, self.pin_memory, self.trainer))


VALPREP = ("The raw ILSVRC2012 val/ is flat (50 000 JPEGs): sort it into val/<wnid>/ folders first, e.g. with "
           "the usual valprep.sh (https://raw.githubusercontent.com/soumith/imagenetloader.torch/master/valprep.sh) "
           "run inside val/.")


def _few(names: list[str]) -> str:
    return "none" if not names else ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _has_image(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in entries)


def _classes(split: Path, name: str) -> dict[str, Path]:
    """``{class: folder}`` of an ImageFolder split, sorted; raises on a flat split or an empty class."""
    folders, images = {}, 0
    with os.scandir(split) as entries:
        for entry in entries:
            if entry.is_dir():
                folders[entry.name] = Path(entry.path)
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                images += 1
    if not folders:
        flat = f" but {images} images directly in it" if images else ""
        raise DatasetError(
            f"ImageNet {name} split {split.resolve()} (data.root) has no class folders{flat}: ImageFolder needs "
            f"{name}/<wnid>/*.JPEG. " + (VALPREP if images else "Point data.root at the folder holding train/ and val/.")
        )
    empty = [c for c, d in sorted(folders.items()) if not _has_image(d)]
    if empty:
        raise DatasetError(
            f"ImageNet {name} split {split.resolve()} (data.root) has {len(empty)} class folder(s) without an image "
            f"({_few(empty)}; extensions {', '.join(IMG_EXTENSIONS)}): ImageFolder would refuse them. Fill or remove "
            f"them in both train/ and val/ (and set data.num_classes to the classes left)."
        )
    return dict(sorted(folders.items()))
