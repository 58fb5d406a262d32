"""A data-free loader for the Noisy Rayleigh Quotient: each batch is a step index."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class StepIndexDataModule(pl.LightningDataModule):
    """``steps_per_epoch`` batches of one integer each (the NRQ draws its own noise)."""

    def __init__(self, steps_per_epoch: int = 1000) -> None:
        super().__init__()
        if steps_per_epoch < 1:
            raise ValueError(f"data.steps_per_epoch must be ≥ 1, got {steps_per_epoch}")
        self.steps_per_epoch = steps_per_epoch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(self.steps_per_epoch)), batch_size=1, shuffle=False)
