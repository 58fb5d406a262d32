"""Full-batch data for the homogeneous-network examples: every step sees the whole training set.

Gradient descent, as in Lyu & Li (2020) and seed 003's experiments, on real data that ships
inside installed packages (nothing is downloaded):

* ``digits``: sklearn's 1797 8×8 digits, 10 classes (:func:`~examples.data.digits.load_digits_tensors`);
* ``lfw``: scikit-image's ``data.lfw_subset()``, 200 real 25×25 images inside the wheel
  (100 faces, then 100 non-faces), a binary task (label 1 = face).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from examples.data.digits import load_digits_tensors

DATASETS = ("digits", "lfw")


def load_lfw_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 200 LFW-subset images as standardized ``[200, 1, 25, 25]`` float32, labels 1 (face) / 0."""
    from skimage.data import lfw_subset

    x = torch.tensor(lfw_subset(), dtype=torch.float32).unsqueeze(1)
    x = x / 255.0 if float(x.max()) > 1.0 else x
    x = (x - x.mean()) / x.std()
    y = torch.cat([torch.ones(100, dtype=torch.long), torch.zeros(len(x) - 100, dtype=torch.long)])
    return x, y


class _Repeated(Dataset):
    """``steps`` items, each the whole ``(x, y)``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


class FullBatchDataModule(pl.LightningDataModule):
    """One batch = the whole training split; an "epoch" is ``steps_per_epoch`` such steps.

    Args:
        dataset: ``"digits"`` (10 classes) or ``"lfw"`` (binary, face / non-face).
        steps_per_epoch: gradient steps per epoch (the epoch is only a bookkeeping unit here).
        val_fraction: fraction kept for validation (a fixed split by ``split_seed``).
    """

    def __init__(self, dataset: str = "digits", steps_per_epoch: int = 50, val_fraction: float = 0.2,
                 split_seed: int = 0) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"data.dataset must be one of {DATASETS}, got {dataset!r}")
        if steps_per_epoch < 1:
            raise ValueError(f"data.steps_per_epoch must be ≥ 1, got {steps_per_epoch}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.dataset, self.steps_per_epoch = dataset, steps_per_epoch
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.train = self.val = None

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        x, y = load_digits_tensors() if self.dataset == "digits" else load_lfw_tensors()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(round(self.val_fraction * len(y)))
        self.train = (x[perm[n_val:]], y[perm[n_val:]])
        self.val = (x[perm[:n_val]], y[perm[:n_val]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Repeated(*self.train, self.steps_per_epoch), batch_size=None, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Repeated(*self.val, 1), batch_size=None, shuffle=False)
