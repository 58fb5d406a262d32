"""The examples' NRQ and digits CNN, configured the way the tests use them (no downloads).

The models and the data are the examples' own (``examples.modules.nrq``, ``examples.modules.nets``,
``examples.data.digits``); here they get a plain ``torch.optim.SGD``/``AdamW`` (one unnamed param
group, ``pg0``) with an optional step-interval ``MultiStepLR``, and the tests' short argument names.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.data.digits import load_digits_tensors, with_label_noise
from examples.modules import nrq
from examples.modules.nets import digits_cnn_layers


def _optimizers(module: pl.LightningModule, optimizer: str, lr: float, weight_decay: float, momentum: float,
                milestones, gamma: float):
    if optimizer == "adamw":
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if not milestones:
        return opt
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), gamma)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class NoisyRayleighQuotient(nrq.NoisyRayleighQuotient):
    """The NRQ with ``trials`` rows and noise seeded by (seed, step): a resumed run sees the same
    noise as an uninterrupted one. With SGD + WD, ‖x‖⁴ → (p − 1)σ²η/(2λ) and Δ → sqrt(2λη).
    ``risks`` collects the noise-free risk of every step."""

    def __init__(self, p=64, sigma=1.0, lr=0.1, weight_decay=5e-3, momentum=0.0, init_norm=1.0, seed=0,
                 milestones=(), gamma=0.1, trials=1):
        super().__init__(dim=p, sigma=sigma, init_norm=init_norm, init_seed=seed, trials=trials, noise_seed=seed)
        self.lr, self.weight_decay, self.momentum = lr, weight_decay, momentum
        self.milestones, self.gamma = list(milestones), gamma
        self.risks: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.risks.append(float(self.risk().detach()))
        return loss

    def configure_optimizers(self):
        return _optimizers(self, "sgd", self.lr, self.weight_decay, self.momentum, self.milestones, self.gamma)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(100000, 1)), batch_size=1)


def digits_loaders(batch_size=64, label_noise=0.0):
    """sklearn's bundled digits (real 8×8 images), standardised, as train loader.

    ``label_noise``: fraction of samples given a fixed random label, so the small CNN cannot
    memorize the set within a test's few hundred steps and its gradient noise stays stationary.
    """
    x, y = load_digits_tensors()
    y = with_label_noise(y, label_noise, seed=0)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


class DigitsCNN(pl.LightningModule):
    """The examples' digits CNN (16/32/32 channels) as one ``nn.Sequential``: its conv weights
    (``model.0``, ``model.3``, ``model.7``) are scale-invariant, the classifier is not."""

    def __init__(self, lr=0.1, weight_decay=5e-3, momentum=0.9, optimizer="sgd", milestones=(), gamma=0.1,
                 label_noise=0.0, input_noise=0.0):
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(*digits_cnn_layers(num_classes=10, width=16))

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.hparams.input_noise:
            x = x + self.hparams.input_noise * torch.randn_like(x)
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        return _optimizers(self, h.optimizer, h.lr, h.weight_decay, h.momentum, h.milestones, h.gamma)

    def train_dataloader(self):
        return digits_loaders(label_noise=self.hparams.label_noise)
