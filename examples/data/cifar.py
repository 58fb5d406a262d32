"""CIFAR10 from the official python pickles (``<root>/cifar-10-batches-py``)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytorch_lightning as pl
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets.utils import check_integrity

from examples.data.common import DatasetNotFoundError, loader_kwargs, require

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class UnverifiedCIFAR10(torchvision.datasets.CIFAR10):
    """``torchvision.datasets.CIFAR10`` without the md5 checks of the official archive.

    torchvision refuses any file whose md5 differs from the official release (in
    ``_check_integrity`` and ``_load_meta``). This subclass only requires the same files in
    the same pickle format (``data_batch_1..5``, ``test_batch``, ``batches.meta``), so a
    re-packed, subset or generated copy loads. Used when ``data.verify=false``.
    """

    def _check_integrity(self) -> bool:
        files = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f in files)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR10 with the standard augmentation (pad-4 random crop + horizontal flip).

    Args:
        root: folder containing ``cifar-10-batches-py/`` (torchvision's layout).
        download: let torchvision download the archive into ``root`` (needs internet).
        verify: check the official md5 sums (torchvision's behaviour). ``false`` accepts any
            files in the same format (re-packed / generated data, see :class:`UnverifiedCIFAR10`).
        batch_size: per-device batch size.
        augment: random crop + flip on the training set.
    """

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = False,
        verify: bool = True,
        batch_size: int = 256,
        num_workers: int = 2,
        pin_memory: bool = True,
        augment: bool = True,
    ) -> None:
        super().__init__()
        self.root = str(root)
        self.download = download
        self.verify = verify
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.augment = augment
        self.train_set = self.val_set = None

    @property
    def dataset_cls(self) -> type[torchvision.datasets.CIFAR10]:
        return torchvision.datasets.CIFAR10 if self.verify else UnverifiedCIFAR10

    def check(self) -> None:
        """Raise a clear error now (before training) when the data is not on disk."""
        if self.download:
            return
        folder = require(
            Path(self.root) / "cifar-10-batches-py",
            "CIFAR10",
            "data.root",
            f"Point data.root=/path/to/dir-containing-cifar-10-batches-py, or set data.download=true "
            f"(needs internet) to fetch it into {self.root}.",
        )
        missing = [f for f in ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
                   if not (folder / f).is_file()]
        if missing:
            raise DatasetNotFoundError(f"CIFAR10 at {folder.resolve()} (data.root) lacks {missing}.")
        ref = torchvision.datasets.CIFAR10
        expected = ref.train_list + ref.test_list + [[ref.meta["filename"], ref.meta["md5"]]]
        if self.verify and not all(check_integrity(str(folder / f), md5) for f, md5 in expected):
            raise DatasetNotFoundError(
                f"CIFAR10 at {folder.resolve()} does not match the official md5 sums; "
                "set data.verify=false to use a re-packed or generated copy."
            )

    def prepare_data(self) -> None:
        if self.download:
            self.dataset_cls(self.root, train=True, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        norm = [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        self.train_set = self.dataset_cls(self.root, train=True, transform=T.Compose(aug + norm))
        self.val_set = self.dataset_cls(self.root, train=False, transform=T.Compose(norm))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, drop_last=True,
                          **loader_kwargs(self.num_workers, self.pin_memory))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, shuffle=False,
                          **loader_kwargs(self.num_workers, self.pin_memory))
