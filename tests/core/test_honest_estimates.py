"""Honest running estimates: ``smd/unit_grad_sq`` (the running L, a positive quantity) is never
logged negative or NaN, and ``smd/weight_norm_theory`` comes with it (see ``estimates.py``)."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_smd import EstimateOptions, SMDCallback
from lightning_smd.core.estimates import RunningMean
from tests.helpers import fit, read_metrics


def _logged(trainer, kind: str) -> dict[str, dict[int, float]]:
    prefix = f"smd/{kind}/"
    return {k[len(prefix):]: v for k, v in read_metrics(trainer).items() if k.startswith(prefix)}


class ConvBN(pl.LightningModule):
    def __init__(self, momentum=0.9, lr=0.1, steps=16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        self.momentum, self.lr, self.steps = momentum, lr, steps

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=5e-4)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(8 * self.steps, 3, 10, 10, generator=g), torch.randint(0, 3, (8 * self.steps,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=8)


def test_no_nan_unit_grad_before_the_first_sample(tmp_path):
    """Measured every 3 steps, L sampled at most every 8: step 5 is measured before any sample
    exists (it logged NaN)."""
    trainer = fit(ConvBN(steps=12), tmp_path, [SMDCallback(log_every_n_steps=3, estimates=EstimateOptions(unit_grad_every=8), verbose=False,
                                                            per_channel=False)], max_steps=12, log_every_n_steps=3)
    unit_grad = _logged(trainer, "unit_grad_sq")
    assert read_metrics(trainer)["smd/angular_update/net.0.weight"]  # measured
    for name, series in unit_grad.items():
        assert all(math.isfinite(v) and v > 0 for v in series.values()), (name, series)
    assert 5 not in unit_grad.get("net.0.weight", {})


def test_estimate_waits_for_a_significantly_positive_mean():
    """Samples of h̃ with momentum: positive mean, single samples of either sign."""
    mean = RunningMean(200.0, positive=True)
    assert math.isnan(mean.update(["w"], [5.0], 0)[0])  # one sample: no spread known yet
    assert math.isnan(mean.update(["w"], [-40.0], 1)[0])  # negative average: not a value of L
    g = torch.Generator().manual_seed(0)
    values = [mean.update(["w"], [float(1.0 + 6.0 * torch.randn((), generator=g))], s)[0] for s in range(2, 400)]
    assert all(math.isnan(v) or v > 0 for v in values)
    assert math.isfinite(values[-1]) and 0.2 < values[-1] < 2.0  # defined once the samples say so
    state = mean.state_dict()
    other = RunningMean(200.0, positive=True)
    other.load_state_dict(state)
    assert other.get("w") == mean.get("w")
    assert other.update(["w"], [1.5], 400) == mean.update(["w"], [1.5], 400)  # and continues exactly
    # without momentum every sample is ≥ 0: defined from the second sample
    plain = RunningMean(200.0, positive=True)
    plain.update(["w"], [2.0], 0)
    assert plain.update(["w"], [2.2], 1)[0] == pytest.approx(2.1, rel=1e-2)


@pytest.mark.slow
def test_resnet18_sgdm_never_logs_a_negative_unit_grad(tmp_path):
    """The issue's repro: torchvision resnet18 with SGD momentum 0.9 (12 of 20 tensors went negative)."""
    import torchvision

    class ResNet(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torchvision.models.resnet18(weights=None, num_classes=4)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(8 * 40, 3, 16, 16, generator=g), torch.randint(0, 4, (8 * 40,), generator=g)
            return DataLoader(TensorDataset(x, y), batch_size=8)

    # measured every 10 steps: 8 tensors logged a negative L before (layer1.0.conv2: -1649 at step 9)
    trainer = fit(ResNet(), tmp_path, [SMDCallback(log_every_n_steps=10, verbose=False, per_channel=False)],
                  max_steps=40, log_every_n_steps=10)
    unit_grad = _logged(trainer, "unit_grad_sq")
    theory = _logged(trainer, "weight_norm_theory")
    assert len(read_metrics(trainer)) > 40 and unit_grad
    bad = {n: min(s.values()) for n, s in unit_grad.items() if not all(math.isfinite(v) and v > 0 for v in s.values())}
    assert not bad
    assert theory  # the prediction is there once L is defined
    for name, series in theory.items():
        assert set(series) <= set(unit_grad[name])  # ‖w*‖ only with a defined L
