"""Running a real Trainer with CSVLogger and reading back what the callback logged."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger


def fit(module, tmp_path, callbacks, max_steps, log_every_n_steps=1, ckpt_path=None, **trainer_kwargs):
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=callbacks,
        log_every_n_steps=log_every_n_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=trainer_kwargs.pop("enable_checkpointing", False),
        accelerator="cpu",
        devices=trainer_kwargs.pop("devices", 1),
        **trainer_kwargs,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def read_metrics(trainer) -> dict[str, dict[int, float]]:
    """metrics.csv of the trainer's CSVLogger as {key: {step: value}}."""
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series[key][step] = float(value)
    return series


def mean_over(series: dict[int, float], first: int, last: int = math.inf) -> float:
    values = [v for s, v in series.items() if first <= s <= last]
    assert values, f"no values between steps {first} and {last}"
    return sum(values) / len(values)
