"""Small real models and data for the tests (no downloads)."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class NoisyRayleighQuotient(pl.LightningModule):
    """SMD_THEORY §5: loss = ½ X̃ᵀ A X̃ + σ εᵀ X̃, X̃ = X/‖X‖, fresh ε ~ N(0, I) per step.

    X is exactly scale-invariant; with SGD + WD, ‖X‖⁴ → (p − 1)σ²η/(2λ) (noise-dominated) and Δ → sqrt(2λη).
    """

    def __init__(self, p=64, sigma=1.0, lr=0.1, weight_decay=5e-3, momentum=0.0, init_norm=1.0, seed=0,
                 milestones=(), gamma=0.1):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.X = nn.Parameter(torch.randn(p, generator=gen) * init_norm / math.sqrt(p))
        self.register_buffer("A", torch.linspace(0.0, 1.0, p))
        self.sigma, self.lr, self.weight_decay, self.momentum = sigma, lr, weight_decay, momentum
        self.milestones, self.gamma = list(milestones), gamma
        self.noise = torch.Generator().manual_seed(seed + 1)

    def risk(self) -> torch.Tensor:
        x = self.X / self.X.norm()
        return 0.5 * (x * self.A * x).sum()

    def training_step(self, batch, batch_idx):
        x = self.X / self.X.norm()
        eps = torch.randn(self.X.shape, generator=self.noise)
        loss = 0.5 * (x * self.A * x).sum() + self.sigma * (eps * x).sum()
        self.log("risk", self.risk().detach(), on_step=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if not self.milestones:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, self.milestones, self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(100000, 1)), batch_size=1)


def digits_loaders(batch_size=64):
    """sklearn's bundled digits (real 8×8 images), standardised, as train loader."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


class DigitsCNN(pl.LightningModule):
    """A small BN CNN on sklearn digits: its conv weights are scale-invariant, the classifier is not."""

    def __init__(self, lr=0.1, weight_decay=5e-3, momentum=0.9, optimizer="sgd", milestones=(), gamma=0.1):
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        if h.optimizer == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        if not h.milestones:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(h.milestones), h.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return digits_loaders()
