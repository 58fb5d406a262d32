"""Rebuild ``docs/angular_update.png``, the README figure, from three real runs (~3 min on 2 CPU cores).

A small BatchNorm CNN learns sklearn's 8×8 digits with SGD + momentum 0.9 and weight decay;
30 % of the labels are random and the inputs get Gaussian noise, so the gradient noise (hence L)
stays steady as on a large dataset. λη = 1e-4: the weights relax towards equilibrium with a time
constant (1−α)/(4λη) = 250 steps, and the learning rate is divided by 10 at step 150, *before*
they got there (Δ_t ≈ 1.4 Δ*). ``SMDCallback`` measures the angular update Δ_t of the three
scale-invariant convolutions, in three runs that differ only in the rescale at the drop:

* ``SMDCallback()``: none; Δ_t falls by 10 while Δ* falls by √10 (Corollary 3.1: thousands of steps to recover),
* ``SMDCallback(rescale=True)``: × 10^(-1/4); this keeps the ratio Δ_t/Δ* it had before the drop
  (exact only at equilibrium), and the callback warns when that ratio is outside ±30 %,
* ``SMDCallback(rescale="equilibrium")``: each tensor to its predicted new equilibrium norm from
  the running L, which puts Δ_t at the new Δ*.

    python docs/make_readme_figure.py [--out docs/angular_update.png]

Prints, per run, the mean Δ_t/Δ* over the conv weights before and after the drop (the caption's numbers).
Needs the ``examples`` extra (matplotlib, scikit-learn).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_smd import SMDCallback, report
from lightning_smd.report.series import RunSeries

STEPS, DROP_AT = 900, 150
LR, WEIGHT_DECAY, MOMENTUM, INPUT_NOISE = 0.1, 1e-3, 0.9, 0.5
MODES = {"SMDCallback()": False, "SMDCallback(rescale=True)": True,
         'SMDCallback(rescale="equilibrium")': "equilibrium"}


class DigitsCNN(pl.LightningModule):
    def __init__(self, lr: float = LR, weight_decay: float = WEIGHT_DECAY, momentum: float = MOMENTUM,
                 input_noise: float = INPUT_NOISE) -> None:
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
        x = x + self.hparams.input_noise * torch.randn_like(x)
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


def run(rescale: bool | str) -> tuple[RunSeries, list[tuple[int, dict[str, float]]], list[str]]:
    """Train once; return what SMDCallback recorded, its raw records and its warnings."""
    pl.seed_everything(0)
    smd = SMDCallback(log_every_n_steps=5, rescale=rescale, verbose=False)
    with tempfile.TemporaryDirectory() as logs, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pl.Trainer(
            max_steps=STEPS, accelerator="cpu", logger=False, default_root_dir=logs, callbacks=[smd],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            log_every_n_steps=5,
        )
        trainer.fit(DigitsCNN(), digits_loader())
    messages = [str(w.message) for w in caught if "away from equilibrium" in str(w.message)]
    return RunSeries.from_records(smd.records), list(smd.records), messages


def mean_ratio(records, first: int, last: int) -> float:
    """Mean over measured steps in [first, last) and over tensors of Δ_t/Δ*."""
    ratios = [v / m[f"smd/angular_update_theory/{k[len('smd/angular_update/'):]}"]
              for step, m in records if first <= step < last
              for k, v in m.items() if k.startswith("smd/angular_update/")]
    return sum(ratios) / len(ratios) if ratios else math.nan


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

    runs = {label: run(mode) for label, mode in MODES.items()}
    fig = Figure(figsize=(16, 5.0), dpi=100, layout="constrained")
    fig.suptitle(f"Angular update $\\Delta_t$ vs theory $\\Delta^*$: BN CNN on digits, SGD momentum 0.9, λη = 1e-4, "
                 f"LR ÷10 at step {DROP_AT}, before equilibrium")
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (label, (series, _, _)) in zip(axes, runs.items()):
        report.draw_angular_update(ax, series, title=label)
    for ax in axes[1:]:
        ax.set_ylabel("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    windows = [(DROP_AT - 50, DROP_AT), (DROP_AT, DROP_AT + 100), (DROP_AT + 100, DROP_AT + 400), (DROP_AT + 400, STEPS)]
    print("\nmean Δ_t/Δ* over the conv weights, per run and step window")
    print(f"{'run':<38}" + "".join(f"{f'{a}–{b}':>12}" for a, b in windows) + "  ±30 % warning")
    for label, (_, records, messages) in runs.items():
        print(f"{label:<38}" + "".join(f"{mean_ratio(records, a, b):>12.2f}" for a, b in windows)
              + f"  {'yes' if messages else 'no'}")
    for label, (series, _, _) in runs.items():
        print(f"\n## {label}\n\n{report.markdown_summary(series)}")


if __name__ == "__main__":
    main()
