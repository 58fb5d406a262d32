"""ImageNet (or any ImageFolder dataset) in the ``train/<class>/*.JPEG``, ``val/<class>/*`` layout."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms as T

from examples.data.common import loader_kwargs, require

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
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        image_size: int = 224,
        val_resize_size: int | None = None,
        batch_size: int = 32,
        num_workers: int = 8,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.image_size = image_size
        self.val_resize_size = val_resize_size or int(round(image_size * 256 / 224))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_set = self.val_set = None

    def check(self) -> None:
        """Raise a clear error now (before training) when a split folder is missing."""
        hint = (
            "Point data.root=/path/to/imagenet holding train/<class>/*.JPEG and val/<class>/*.JPEG "
            "(ImageNet cannot be downloaded automatically)."
        )
        require(self.root / "train", "ImageNet train split", "data.root", hint)
        require(self.root / "val", "ImageNet val split", "data.root", hint)

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
                          **loader_kwargs(self.num_workers, self.pin_memory))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, shuffle=False,
                          **loader_kwargs(self.num_workers, self.pin_memory))
