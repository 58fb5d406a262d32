"""Rebuild ``docs/angular_update.png``, the README figure, from two real runs (~1–2 min on CPU).

A small BatchNorm CNN learns sklearn's 8×8 digits with SGD + momentum and weight decay; the
learning rate is divided by 10 half-way; 30 % of the labels are random, so the gradient noise
stays steady as on a large dataset. ``SMDCallback`` measures the angular update Δ_t of
the two scale-invariant convolutions: it settles at Δ* = sqrt(2λη/(1+α)), then, after the drop,
needs about log(10)·(1−α)/(4λη) steps to reach the new, smaller Δ* (SMD paper, Fig. 3).
The right panel repeats the run with ``SMDCallback(rescale=True)``: the weights are rescaled
at the drop and Δ_t follows the new Δ* at once.

    python docs/make_readme_figure.py [--out docs/angular_update.png]

Needs the ``examples`` extra (matplotlib, scikit-learn).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_smd import SMDCallback, report
from lightning_smd.series import RunSeries

STEPS, DROP_AT = 1600, 800


class DigitsCNN(pl.LightningModule):
    def __init__(self, lr: float = 0.4, weight_decay: float = 1e-3, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        drop = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[DROP_AT], gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": drop, "interval": "step"}}


def digits_loader(batch_size: int = 64, label_noise: float = 0.3) -> DataLoader:
    """sklearn digits with a fixed fraction of random labels, so the training loss never
    reaches zero and the gradient noise (hence L) stays steady, as on a large dataset."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    noisy = torch.rand(len(y), generator=g) < label_noise
    y[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True)


def run(rescale: bool) -> RunSeries:
    """Train once and return what SMDCallback recorded."""
    pl.seed_everything(0)
    smd = SMDCallback(log_every_n_steps=5, rescale=rescale, verbose=False)
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(
            max_steps=STEPS, accelerator="cpu", logger=False, default_root_dir=logs, callbacks=[smd],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            log_every_n_steps=5,
        )
        trainer.fit(DigitsCNN(), digits_loader())
    return RunSeries.from_records(smd.records)


def pin_threads() -> int:
    """torch's intra-op threads = the CPUs this process may use (``os.sched_getaffinity``, less
    those the load average keeps busy, at most 2 when ``CI`` is set), unless ``OMP_NUM_THREADS`` is set: torch sizes its pool from
    the machine's cores, which oversubscribes a shared or containerized CPU (as examples/threads.py)."""
    import os

    if not os.environ.get("OMP_NUM_THREADS"):
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        cpus = min(cpus, int(cpus - os.getloadavg()[0] + 0.5))  # less the busy ones
        torch.set_num_threads(max(1, min(cpus, 2) if os.environ.get("CI") else cpus))
    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("angular_update.png"))
    args = parser.parse_args()
    pin_threads()

    from matplotlib.figure import Figure

    runs = {"SMDCallback()": run(rescale=False), "SMDCallback(rescale=True)": run(rescale=True)}
    fig = Figure(figsize=(13, 5.0), dpi=110, layout="constrained")
    fig.suptitle(f"Angular update $\\Delta_t$ vs theory $\\Delta^*$: BN CNN on digits, SGD momentum 0.9, "
                 f"LR ÷10 at step {DROP_AT}")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (label, series) in zip(axes, runs.items()):
        report.draw_angular_update(ax, series, title=label)
    axes[1].set_ylabel("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    for label, series in runs.items():
        print(f"\n## {label}\n\n{report.markdown_summary(series)}")


if __name__ == "__main__":
    main()
