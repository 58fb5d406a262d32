"""``SMDCallback`` serves ``pytorch_lightning`` and ``lightning.pytorch`` Trainers identically: the
same ``smd/*`` series (bit-equal), per-channel TensorBoard histograms, and figures in the logger's
directory (before, under ``lightning.pytorch`` the histograms were missing and the figures went to
``default_root_dir/smd``); the W&B offline extras; a 2-process DDP fit and its resume."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_smd import SMDCallback
from tests.helpers import read_metrics

STEPS = 10
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["pytorch_lightning", "lightning.pytorch"])
def L(request):
    """The Lightning namespace under test."""
    return importlib.import_module(request.param)


def make_net(L, samples: int = 16 * STEPS, drop_at: int | None = None) -> type:
    """The tests' LightningModule for the namespace ``L`` (one definition, also the DDP script's): a
    linear layer under BatchNorm, SGD with momentum, ``samples`` seeded examples in batches of 16; with
    ``drop_at``, the LR ÷10 at that optimizer step."""

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
            if drop_at is None:
                return opt
            drop = torch.optim.lr_scheduler.MultiStepLR(opt, [drop_at], 0.1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": drop, "interval": "step"}}

        def train_dataloader(self):
            gen = torch.Generator().manual_seed(0)
            x, y = torch.randn(samples, 8, generator=gen), torch.randint(0, 4, (samples,), generator=gen)
            return DataLoader(TensorDataset(x, y), batch_size=16)

    return Net


def _fit(L, root: Path, loggers=None):
    cb = SMDCallback(log_every_n_steps=1, per_channel=1, verbose=False)
    tensorboard = L.loggers.TensorBoardLogger(root, name="tb", version=0)
    csv = L.loggers.CSVLogger(root, name="csv", version=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=[tensorboard, csv, *(loggers or [])], callbacks=[cb],
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=root)
    trainer.fit(make_net(L)())
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


@pytest.mark.slow
def test_wandb_offline_extras(L, tmp_path, offline_wandb):
    """The W&B extras (metric definitions, figures, the per-layer table, per-channel histograms) and
    the same ``smd/*`` series as the callback's records, from the ``.wandb`` file of an offline run."""
    import wandb
    import numpy as np

    from lightning_smd.report.series import RunSeries, read_wandb_records

    logger = L.loggers.WandbLogger(offline=True, save_dir=str(tmp_path), project="smd-test")
    _, cb, *_ = _fit(L, tmp_path, loggers=[logger])
    wandb.finish()
    wandb.teardown()  # the .wandb file is complete once the service is gone
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    kinds: dict[str, list] = {}
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        kinds.setdefault(kind, []).append(getattr(record, kind))
    defined = {m.name or m.glob_name for m in kinds["metric"]}
    assert {"smd/*", "smd_figures/*", "smd_summary/*"} <= defined
    keys = {item.key or ".".join(item.nested_key) for history in kinds["history"] for item in history.item}
    assert "smd_figures/angular_update._type" in keys and "smd_summary/layers._type" in keys
    assert any(k.startswith("smd/channel_hist") for k in keys)
    series, expected = RunSeries.from_wandb_offline(tmp_path), RunSeries.from_records(cb.records)
    assert series.names == expected.names == ["net.0.weight"]
    at = np.isin(series.steps, expected.steps)
    np.testing.assert_array_equal(series.angular_update[at], expected.angular_update)


DDP_RESUME = """
import importlib, json, sys
from lightning_smd import SMDCallback
from tests.lightning.test_namespaces import make_net

L = importlib.import_module(sys.argv[1])
root = sys.argv[2]
Net = make_net(L, samples=16 * 2 * 10, drop_at=7)


def fit(steps, version, ckpt_path=None):
    cb = SMDCallback(log_every_n_steps=1, rescale=True, verbose=False, figures_dir=f"{root}/smd{version}")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, log_every_n_steps=1,
                        logger=L.loggers.CSVLogger(root, name="csv", version=version),
                        callbacks=[cb, L.callbacks.ModelCheckpoint(dirpath=f"{root}/ckpt", save_last=True)],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Net(), ckpt_path=ckpt_path)
    return trainer, cb


first, cb1 = fit(5, 0)
second, cb2 = fit(10, 1, f"{root}/ckpt/last.ckpt")
if second.is_global_zero:
    json.dump({"namespace": type(second).__module__, "world_size": second.world_size,
               "tracked": [sorted(cb1.candidates), sorted(cb2.candidates)],
               "sources": sorted({c.source for c in cb2.candidates.values()}),
               "steps": [sorted({s for s, _ in cb1.records}), sorted({s for s, _ in cb2.records})],
               "rescales": [e["step"] for e in cb2.rescale_events]}, open(f"{root}/out.json", "w"))
"""


@pytest.mark.slow
def test_ddp_fit_and_resume(L, tmp_path):
    """Two processes (DDP, gloo on CPU), then a resume from the checkpoint: the tracked tensors are
    restored (no second detection), the series goes on at the next step, the LR drop after the
    resume is rescaled once."""
    script = tmp_path / "ddp_resume.py"
    script.write_text(DDP_RESUME)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(script), L.__name__, str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["namespace"].startswith(L.__name__) and result["world_size"] == 2
    assert result["tracked"] == [["net.0.weight"], ["net.0.weight"]]
    assert result["sources"] == ["checkpoint"]  # restored, not detected again
    first, second = result["steps"]
    assert first and max(first) == 4 and min(second) == 5 and max(second) == 9, result["steps"]
    assert result["rescales"] == [7]
