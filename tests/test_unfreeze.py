"""Unfreezing by ``requires_grad`` (the fine-tuning recipe without ``add_param_group``): a conv frozen
but already in the optimizer, unfrozen by a user callback at step 10, is tracked from its first
steps and reported like tensors added by ``add_param_group``."""

from __future__ import annotations

import logging
import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_smd import SMDCallback
from tests.helpers import fit, read_metrics


class FrozenStem(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.conv, self.bn1 = nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)
        self.stem.weight.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.bn1(self.conv(torch.relu(self.bn0(self.stem(x))))))
        return nn.functional.cross_entropy(self.head(h.mean(dim=(2, 3))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(8 * 30, 3, 10, 10, generator=g),
                                        torch.randint(0, 3, (8 * 30,), generator=g)), batch_size=8)


class Unfreeze(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 10:
            pl_module.stem.weight.requires_grad_(True)


def test_unfrozen_tensor_is_tracked_and_reported(tmp_path, caplog):
    import lightning_smd.callback as callback

    said = []
    cb = SMDCallback(log_every_n_steps=1, per_channel=False)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = callback.rank_zero_info
        callback.rank_zero_info = lambda msg, *a, **k: said.append(msg) or original(msg, *a, **k)
        try:
            trainer = fit(FrozenStem(), tmp_path, [Unfreeze(), cb], max_steps=24)
        finally:
            callback.rank_zero_info = original
    assert "stem.weight" in cb.candidates
    steps = sorted(read_metrics(trainer)["smd/angular_update/stem.weight"])
    assert steps and 10 <= steps[0] <= 15 and steps[-1] == 23  # tracked after its detection steps
    assert any("unfrozen (requires_grad) at step 10" in m and "stem.weight" in m for m in said), said
