"""sklearn's bundled 8×8 digits (1797 images, offline): the quickstart dataset."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


#: mean and standard deviation of the digits' pixels scaled to [0, 1] (all 1797 images)
PIXEL_MEAN, PIXEL_STD = 0.3053, 0.3761


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 images as standardized ``[N, 1, 8, 8]`` float32, and their labels (int64)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return (x - PIXEL_MEAN) / PIXEL_STD, torch.tensor(digits.target, dtype=torch.long)


def with_label_noise(labels: torch.Tensor, fraction: float, seed: int, num_classes: int = 10) -> torch.Tensor:
    """``labels`` with a ``fraction`` of them (chosen by ``seed``) replaced by fixed random labels."""
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(labels), generator=gen) < fraction
    return torch.where(flip, torch.randint(0, num_classes, labels.shape, generator=gen), labels)


class DigitsDataModule(pl.LightningDataModule):
    """``sklearn.datasets.load_digits`` as 1×8×8 float tensors, standardized (:func:`load_digits_tensors`).

    A fixed split (``split_seed``) keeps ``val_fraction`` of the images for validation.
    Nothing is downloaded: the data ships with scikit-learn.

    ``label_noise`` gives that fraction of the *training* images a fixed random label. 1437
    images are memorized within a few hundred steps; then the gradient dies out, the unit
    gradient L keeps falling and Δ_t lags Δ*. With noisy labels the gradient noise stays
    stationary, as on ImageNet-sized data, and the SMD equilibrium is what you see.
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
        label_noise: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be ≥ 1, got {batch_size}")
        if not 0 <= label_noise < 1:
            raise ValueError(f"data.label_noise must be in [0, 1), got {label_noise}")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.label_noise = label_noise
        self.train_set = self.val_set = None

    def check(self, world_size: int = 1) -> None:
        """The batch size must leave at least one training batch (the loader drops the last one)."""
        from examples.data.common import check_batches

        total = 1797
        check_batches(total - int(round(self.val_fraction * total)), self.batch_size, world_size,
                      "sklearn's digits (data.val_fraction of them held out)")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(round(self.val_fraction * len(y)))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        y_train = with_label_noise(y[train_idx], self.label_noise, seed=self.split_seed + 1)
        self.train_set = TensorDataset(x[train_idx], y_train)
        self.val_set = TensorDataset(x[val_idx], y[val_idx])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, drop_last=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, 256, shuffle=False, num_workers=self.num_workers)
