"""What a user would otherwise write: two peer monitors the benchmark runs beside SMDCallback.

Both are written from the published descriptions of what they log, not from their code, and track
the same tensors as ``naive_reference.py`` (every ``Conv2d`` weight; each feeds a BatchNorm in a
torchvision ResNet). Not part of the library; deliberately written the way research code does it.

* :class:`CvpodsStyleMonitor` — the first-order angular update the SMD authors log in cvpods:
  ``‖w_{t+1} − w_t‖ / ‖w_t‖`` per parameter (``sin Δ ≈ Δ`` to first order), from a copy of the
  previous weights kept between steps (refreshed after every step), one ``.item()`` per parameter.
* :class:`ReqStylePerNeuronMonitor` — per-neuron rotation as in "Rotational Equilibrium" (REQ,
  Kosson et al.): every output channel's angle ``acos(cos(w_t, w_{t+1}))``, from clones taken
  before the step; per layer the mean and spread over neurons, one host transfer per layer.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from naive_reference import NaiveAngularUpdate, _conv_weights_before_norm as _conv_weights  # the naive reference's tensors


class CvpodsStyleMonitor(pl.Callback):
    """First-order angular update ``‖Δw‖/‖w‖`` per conv weight every ``every`` steps, ``.item()`` each."""

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.params: list[tuple[str, torch.Tensor]] = []
        self.previous: dict[str, torch.Tensor] = {}
        self.last: dict[str, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.params = _conv_weights(pl_module)
        self.previous = {name: p.detach().clone() for name, p in self.params}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        log = trainer.global_step % self.every == 0
        metrics = {}
        for name, p in self.params:
            w_old, w_new = self.previous[name], p.detach()
            if log:
                metrics[f"cvpods/angular_update/{name}"] = ((w_new - w_old).norm() / w_old.norm()).item()
            w_old.copy_(w_new)
        if log:
            self.last = metrics
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step - 1)


class ReqStylePerNeuronMonitor(NaiveAngularUpdate):
    """Per-neuron (output channel) rotation of every conv weight from clones taken before the step
    (the naive reference's clone-before-step, with per-row angles and four statistics per tensor)."""

    def metrics_of(self, name: str, w0: torch.Tensor, w1: torch.Tensor) -> dict[str, float]:
        w0, w1 = w0.flatten(1), w1.flatten(1)
        cos = (w0 * w1).sum(1) / (w0.norm(dim=1) * w1.norm(dim=1))
        angles = torch.acos(cos.clamp(-1.0, 1.0))
        mean, std, low, high = torch.stack([angles.mean(), angles.std(), angles.min(), angles.max()]).tolist()
        return {f"req/rotation_mean/{name}": mean, f"req/rotation_std/{name}": std,
                f"req/rotation_min/{name}": low, f"req/rotation_max/{name}": high}
