"""Runs that must stay quiet: a model with nothing scale-invariant says so once and nothing else;
``fast_dev_run`` (Lightning's ``DummyLogger``) writes no file; without a logger the figures go
under ``default_root_dir``, as Lightning's checkpoints do, never into the working directory."""

from __future__ import annotations

import logging
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_smd import SMDCallback


class Plain(pl.LightningModule):
    """No normalization anywhere (``norm=False``), or a BN MLP (``norm=True``); an LR drop at step 10."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        layers = [nn.Linear(8, 16, bias=not norm)] + ([nn.BatchNorm1d(16)] if norm else []) + [nn.ReLU(), nn.Linear(16, 2)]
        self.net = nn.Sequential(*layers)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 10, 0.1), "interval": "step"}]

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(256, 8, generator=g), torch.randint(0, 2, (256,), generator=g)),
                          batch_size=8)


def _fit(module, root, **kwargs):
    trainer = pl.Trainer(accelerator="cpu", default_root_dir=root, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, **kwargs)
    trainer.fit(module)
    return trainer


def test_nothing_scale_invariant_is_said_once_and_nothing_else(tmp_path, caplog):
    cb = SMDCallback(log_every_n_steps=1, rescale=True)
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(Plain(norm=False), tmp_path, max_steps=20, logger=False, callbacks=[cb])
    said = [r.getMessage() for r in caplog.records if "SMD" in r.getMessage()]
    said += [str(w.message) for w in caught if "SMD" in str(w.message)]
    assert len(said) == 1, said
    assert "nothing to measure" in said[0] and "none of the 4 trainable tensors is scale-invariant" in said[0]
    assert not cb.candidates and not list(cb.records), list(cb.records)


def test_everything_excluded_says_so(tmp_path, caplog):
    cb = SMDCallback(log_every_n_steps=1, exclude=r"net\.0\.")
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(Plain(norm=True), tmp_path, max_steps=8, logger=False, callbacks=[cb])
    said = [r.getMessage() for r in caplog.records if "SMD" in r.getMessage()]
    assert len(said) == 1 and "left out by SMDCallback(include=..., exclude=...)" in said[0], said
    assert "net.0.weight" in said[0]


@pytest.mark.parametrize("fast_dev_run", [True, 8])
def test_fast_dev_run_writes_nothing(tmp_path, monkeypatch, fast_dev_run):
    monkeypatch.chdir(tmp_path)
    cb = SMDCallback(log_every_n_steps=1, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(Plain(norm=True), None, fast_dev_run=fast_dev_run, callbacks=[cb])
    assert cb.candidates or fast_dev_run is True  # 8 steps: detected and measured
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


def test_without_logger_figures_go_under_default_root_dir(tmp_path, monkeypatch):
    cwd, root = tmp_path / "cwd", tmp_path / "root"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cb = SMDCallback(log_every_n_steps=1, verbose=False, per_channel=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(Plain(norm=True), root, max_steps=8, logger=False, callbacks=[cb])
    assert list(cwd.iterdir()) == []
    assert (root / "smd" / "smd_angular_update.png").is_file()
