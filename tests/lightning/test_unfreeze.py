"""Unfreezing by ``requires_grad`` (the fine-tuning recipe without ``add_param_group``): a conv frozen
but already in the optimizer, unfrozen by a user callback at step 10, is tracked from its first
steps and reported like tensors added by ``add_param_group``."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
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
    import lightning_smd.core.engine as callback  # the engine prints the reports

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


class UnfreezeFrom(pl.Callback):
    """Unfreezes at step 10, and again in a run resumed after it (the freeze is the model's own)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= 10:
            pl_module.stem.weight.requires_grad_(True)


class FrozenStemOneBatch(FrozenStem):
    """Every batch the same: a run resumed mid-epoch (Lightning restarts the epoch's loader) sees the
    batches of an uninterrupted one."""

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 3, 10, 10, generator=g), torch.randint(0, 3, (8,), generator=g)
        return DataLoader(TensorDataset(x.repeat(30, 1, 1, 1), y.repeat(30)), batch_size=8)


@pytest.mark.slow  # three short fits
def test_resume_while_the_unfrozen_tensor_is_being_decided_on_is_bit_equal(tmp_path):
    """Checkpoint at step 11: the stem trains from step 10 and its detection has not decided yet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        straight = FrozenStemOneBatch()
        first, resumed = copy.deepcopy(straight), copy.deepcopy(straight)
        whole = fit(straight, tmp_path / "straight", [UnfreezeFrom(), SMDCallback(log_every_n_steps=1)], max_steps=20)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=11, save_top_k=-1)
        fit(first, tmp_path / "first", [UnfreezeFrom(), SMDCallback(log_every_n_steps=1), ckpt], max_steps=11,
            enable_checkpointing=True)
        path = next((tmp_path / "ckpt").iterdir())
        again = fit(resumed, tmp_path / "resumed", [UnfreezeFrom(), SMDCallback(log_every_n_steps=1)], max_steps=20,
                    ckpt_path=str(path))
    saved = torch.load(path, weights_only=True)["callbacks"]["SMDCallback"]
    assert saved["tracked"] and saved["detection"]["names"] == ["stem.weight"]  # under way when saved
    m, m_resumed = read_metrics(whole), read_metrics(again)
    key = "smd/angular_update/stem.weight"
    assert min(m[key]) > 11 and m_resumed[key] == {s: v for s, v in m[key].items() if s >= 11}  # same decision step
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
