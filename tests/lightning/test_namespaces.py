"""``SMDCallback`` serves ``pytorch_lightning`` and ``lightning.pytorch`` Trainers identically: the
same ``smd/*`` series (bit-equal), per-channel TensorBoard histograms, and figures in the logger's
directory (before, under ``lightning.pytorch`` the histograms were missing and the figures went to
``default_root_dir/smd``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_smd import SMDCallback
from tests.helpers import read_metrics

STEPS = 10


@pytest.fixture(params=["pytorch_lightning", "lightning.pytorch"])
def L(request):
    """The Lightning namespace under test."""
    return importlib.import_module(request.param)


def _fit(L, root: Path):
    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)

        def train_dataloader(self):
            gen = torch.Generator().manual_seed(0)
            x, y = torch.randn(16 * STEPS, 8, generator=gen), torch.randint(0, 4, (16 * STEPS,), generator=gen)
            return DataLoader(TensorDataset(x, y), batch_size=16)

    cb = SMDCallback(log_every_n_steps=1, per_channel=1, verbose=False)
    tensorboard = L.loggers.TensorBoardLogger(root, name="tb", version=0)
    csv = L.loggers.CSVLogger(root, name="csv", version=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=[tensorboard, csv], callbacks=[cb],
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=root)
    trainer.fit(Net())
    return trainer, cb, tensorboard, csv


def _histogram_tags(log_dir: str) -> set[str]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(log_dir, size_guidance={ea.HISTOGRAMS: 0})
    acc.Reload()
    return set(acc.Tags()["histograms"])


@pytest.mark.slow
def test_outputs_land_where_the_loggers_are(L, tmp_path):
    trainer, cb, tensorboard, csv = _fit(L, tmp_path)
    assert set(cb.candidates) == {"net.0.weight"}
    figures = Path(tensorboard.log_dir) / "smd"
    assert cb.figures_path(trainer) == figures
    assert (figures / "smd_angular_update.png").is_file()
    assert not (tmp_path / "smd").exists()
    assert any(t.startswith("smd/") for t in _histogram_tags(tensorboard.log_dir))


@pytest.mark.slow
def test_same_series_under_both_namespaces(tmp_path):
    series = {}
    for name in ("pytorch_lightning", "lightning.pytorch"):
        *_, csv = _fit(importlib.import_module(name), tmp_path / name)
        series[name] = {k: v for k, v in read_metrics(type("T", (), {"logger": csv})).items() if k.startswith("smd/")}
    assert len(series["pytorch_lightning"]["smd/angular_update/net.0.weight"]) >= 6
    # bit-equal (NaN: a step without an L sample, the same in both)
    same = {k: {s: repr(v) for s, v in by_step.items()} for k, by_step in series["pytorch_lightning"].items()}
    assert same == {k: {s: repr(v) for s, v in by_step.items()} for k, by_step in series["lightning.pytorch"].items()}
