"""The naive way research code measures the angular update: the reference the benchmark compares to.

Per measured step: clone every tracked weight before the optimizer step, and after it compute
``acos`` of the cosine between old and new weights, calling ``.item()`` per tensor (one host
sync each). It tracks the weights of every ``Conv2d``/``Linear`` that feeds a BatchNorm directly,
which for torchvision ResNets is every conv, i.e. the same tensors ``SMDCallback`` detects.
Not part of the library; kept deliberately simple and unoptimized.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn


def _conv_weights_before_norm(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    # In torchvision ResNets every Conv2d is immediately followed by a BatchNorm2d.
    return [(f"{name}.weight", m.weight) for name, m in module.named_modules() if isinstance(m, nn.Conv2d)]


class NaiveAngularUpdate(pl.Callback):
    """Log acos(cos(w_t, w_{t+1})) and ‖w‖ per conv weight every ``every`` optimizer steps."""

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.params: list[tuple[str, torch.Tensor]] = []
        self.before: dict[str, torch.Tensor] | None = None
        self.last: dict[str, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.params = _conv_weights_before_norm(pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if (trainer.global_step + 1) % self.every == 0:
            self.before = {name: p.detach().clone() for name, p in self.params}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.before is None:
            return
        metrics = {}
        for name, p in self.params:
            metrics.update(self.metrics_of(name, self.before[name], p.detach()))
        self.before = None
        self.last = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step - 1)

    def metrics_of(self, name: str, w0: torch.Tensor, w1: torch.Tensor) -> dict[str, float]:
        """The metrics of one tensor from its clone before the step and its value after it."""
        cos = (w0 * w1).sum() / (w0.norm() * w1.norm())
        return {f"naive/angular_update/{name}": torch.acos(cos.clamp(-1.0, 1.0)).item(),
                f"naive/weight_norm/{name}": w1.norm().item()}
