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

from examples.data.common import DatasetError, DatasetNotFoundError, check_batches, check_num_classes, loader_kwargs, require

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
        num_workers: loader workers; ``None``: the CPUs available per device, minus one (≤ 8).
        pin_memory: ``None``: pin when training on a CUDA device.
        augment: random crop + flip on the training set.
        num_classes: the model's classes (``data.num_classes``), checked against ``batches.meta``.
    """

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = False,
        verify: bool = True,
        batch_size: int = 256,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        augment: bool = True,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.root = str(root)
        self.download = download
        self.verify = verify
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.augment = augment
        self.num_classes = num_classes
        self.train_set = self.val_set = None

    @property
    def dataset_cls(self) -> type[torchvision.datasets.CIFAR10]:
        return torchvision.datasets.CIFAR10 if self.verify else UnverifiedCIFAR10

    def check(self, world_size: int = 1) -> None:
        """Raise a clear error now (before the model is built) when the data is not on disk, a batch
        file is unreadable or not CIFAR-shaped, ``num_classes`` differs from ``batches.meta``, or
        ``batch_size`` leaves no training batch over ``world_size`` processes. Reads the 7 small
        pickles once (≈ 180 MB for the real set)."""
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
        names = _read_pickle(folder / "batches.meta", "label_names", list)["label_names"]
        check_num_classes(self.num_classes, len(names), f"{folder / 'batches.meta'} (data.root)", "label_names")
        train = sum(_check_batch(folder / f"data_batch_{i}", len(names)) for i in range(1, 6))
        _check_batch(folder / "test_batch", len(names))
        check_batches(train, self.batch_size, world_size, f"{folder} (data.root)")

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
                          **loader_kwargs(self.num_workers, self.pin_memory, self.trainer))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, shuffle=False,
                          **loader_kwargs(self.num_workers, self.pin_memory, self.trainer))


_FIX = ("Re-extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into data.root, "
        "or rewrite the file as a pickled dict like the official one.")


def _read_pickle(path: Path, key: str, kind: type) -> dict:
    """One official CIFAR pickle (python 2 protocol: latin-1 strings), checked to hold ``key``."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as err:  # truncated (EOFError, UnpicklingError), not a pickle, unreadable
        raise DatasetError(f"CIFAR10 file {path.resolve()} (data.root) cannot be read: "
                           f"{type(err).__name__}: {err}. {_FIX}") from None
    if not isinstance(entry, dict) or not isinstance(entry.get(key), kind):
        found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise DatasetError(f"CIFAR10 file {path.resolve()} (data.root) has no {key!r} {kind.__name__} "
                           f"(found {found}). {_FIX}")
    return entry


def _check_batch(path: Path, num_classes: int) -> int:
    """A data batch: ``data`` uint8 ``[N, 3072]`` and ``labels`` N ints in ``[0, num_classes)``; returns N."""
    import numpy as np

    entry = _read_pickle(path, "data", np.ndarray)
    data, labels = entry["data"], entry.get("labels")
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DatasetError(f"CIFAR10 file {path.resolve()} (data.root): 'data' is {data.dtype} {list(data.shape)}, "
                           f"expected uint8 [N, 3072] (32×32×3 rows). {_FIX}")
    if not isinstance(labels, list) or len(labels) != len(data):
        got = f"{len(labels)} labels" if isinstance(labels, list) else "no 'labels' list"
        raise DatasetError(f"CIFAR10 file {path.resolve()} (data.root) has {got} for {len(data)} images. {_FIX}")
    bad = [y for y in labels if not isinstance(y, int) or not 0 <= y < num_classes]
    if bad:
        raise DatasetError(f"CIFAR10 file {path.resolve()} (data.root) has labels outside [0, {num_classes}) "
                           f"(e.g. {bad[0]!r}), the classes of batches.meta. {_FIX}")
    return len(data)
