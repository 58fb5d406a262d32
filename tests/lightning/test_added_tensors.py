"""Tensors that appear later: param groups added to an optimizer after fit start (fine-tuning)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BackboneFinetuning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_smd import SMDCallback
from tests.helpers import fit, read_metrics


class FineTuned(pl.LightningModule):
    """A BN backbone (frozen at first) and a BN head; ``BackboneFinetuning`` unfreezes the backbone."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
                                      nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-3)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(320, 8, generator=gen)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32)  # 10 steps per epoch


def test_backbone_unfrozen_by_backbone_finetuning_is_detected_and_tracked(tmp_path, caplog):
    smd = SMDCallback(log_every_n_steps=1)
    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0)
    with caplog.at_level("INFO", logger="pytorch_lightning.utilities.rank_zero"):
        trainer = fit(FineTuned(), tmp_path, [finetune, smd], max_steps=30)
    assert len(trainer.optimizers[0].param_groups) == 2  # the backbone came in as a new group at step 10
    m = read_metrics(trainer)
    head, backbone = "smd/angular_update/head.0.weight", ["backbone.0.weight", "backbone.3.weight"]
    assert min(m[head]) == 4  # detected in the first steps
    for name in backbone:
        steps = sorted(m[f"smd/angular_update/{name}"])
        assert steps[0] == 13 and steps[-1] == 29  # decided in its 4th step (like at fit start), tracked from then on
        assert all(v > 0 for v in m[f"smd/angular_update/{name}"].values())
        assert m[f"smd/angular_update_theory/{name}"][29] > 0
    assert set(smd.candidates) == {"head.0.weight", *backbone}
    assert "BatchNorm" not in " ".join(smd.candidates)  # γ/β of the unfrozen BNs are not scale-invariant
    reports = [r.getMessage() for r in caplog.records if "added to the optimizers" in r.getMessage()]
    assert len(reports) == 1 and "at step 10" in reports[0] and "backbone.0.weight" in reports[0]
