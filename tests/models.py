"""Small real models and data for the tests (no downloads)."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class NoisyRayleighQuotient(pl.LightningModule):
    """SMD_THEORY §5: loss = ½ X̃ᵀ A X̃ + σ εᵀ X̃, X̃ = X/‖X‖, fresh ε ~ N(0, I) per step.

    ``trials`` independent copies live in the rows of one parameter ``X`` (each row normalized
    on its own, so the whole tensor is scale-invariant and each row follows its own NRQ). The
    noise of step t is drawn from a generator seeded with (seed, t): a resumed run sees the same
    noise as an uninterrupted one. With SGD + WD, ‖x‖⁴ → (p − 1)σ²η/(2λ) and Δ → sqrt(2λη).
    """

    def __init__(self, p=64, sigma=1.0, lr=0.1, weight_decay=5e-3, momentum=0.0, init_norm=1.0, seed=0,
                 milestones=(), gamma=0.1, trials=1):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.X = nn.Parameter(torch.randn(trials, p, generator=gen) * init_norm / math.sqrt(p))
        self.register_buffer("A", torch.linspace(0.0, 1.0, p))
        self.sigma, self.lr, self.weight_decay, self.momentum = sigma, lr, weight_decay, momentum
        self.milestones, self.gamma, self.seed = list(milestones), gamma, seed
        self.risks: list[float] = []

    def unit(self) -> torch.Tensor:
        return self.X / self.X.norm(dim=1, keepdim=True)

    def risk(self) -> torch.Tensor:
        """½ X̃ᵀ A X̃ averaged over trials."""
        x = self.unit()
        return 0.5 * (x * self.A * x).sum(dim=1).mean()

    def training_step(self, batch, batch_idx):
        x = self.unit()
        noise = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)
        eps = torch.randn(self.X.shape, generator=noise)
        loss = (0.5 * (x * self.A * x).sum(dim=1) + self.sigma * (eps * x).sum(dim=1)).sum()
        self.risks.append(float(self.risk().detach()))
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if not self.milestones:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, self.milestones, self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(100000, 1)), batch_size=1)


def digits_loaders(batch_size=64, label_noise=0.0):
    """sklearn's bundled digits (real 8×8 images), standardised, as train loader.

    ``label_noise``: fraction of samples given a fixed random label, so the small CNN cannot
    memorize the set within a test's few hundred steps and its gradient noise stays stationary.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    gen = torch.Generator().manual_seed(0)
    flip = torch.rand(len(y), generator=gen) < label_noise
    y = torch.where(flip, torch.randint(0, 10, y.shape, generator=gen), y)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


class DigitsCNN(pl.LightningModule):
    """A small BN CNN on sklearn digits: its conv weights are scale-invariant, the classifier is not."""

    def __init__(self, lr=0.1, weight_decay=5e-3, momentum=0.9, optimizer="sgd", milestones=(), gamma=0.1,
                 label_noise=0.0, input_noise=0.0):
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
        if self.hparams.input_noise:
            x = x + self.hparams.input_noise * torch.randn_like(x)
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
        return digits_loaders(label_noise=self.hparams.label_noise)
