"""What a user sees: piped output in whole lines, the SMD reports on their own lines, train.log
holding the run's log lines, no "will be deleted" warning on a fresh run."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.examples_fixtures import TRAIN_PY, subprocess_env

from examples.console import LineProgressBar, TqdmHandler, progress_bar_for, route_lightning_logs


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_line_progress_bar_prints_a_few_whole_lines_per_epoch(tmp_path, capsys):
    x = torch.randn(80, 4)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[LineProgressBar(lines_per_epoch=4)],
                         default_root_dir=tmp_path)
    trainer.fit(_Tiny(), DataLoader(TensorDataset(x, x[:, :1]), batch_size=4))  # 20 batches an epoch
    out = capsys.readouterr().out
    assert "\r" not in out
    bars = [line for line in out.splitlines() if line.startswith("Epoch")]
    assert [b.split("|")[0].split()[:2] for b in bars] == [["Epoch", "0:"]] * 4 + [["Epoch", "1:"]] * 4
    assert [b.split("|")[2].split()[0] for b in bars[:4]] == ["5/20", "10/20", "15/20", "20/20"]
    assert "loss=" in bars[-1]


def test_progress_bar_choice_follows_the_terminal():
    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    assert progress_bar_for(Stream(True)) is None
    assert isinstance(progress_bar_for(Stream(False)), LineProgressBar)


def test_lightning_log_lines_reach_hydras_handlers(tmp_path):
    """As under @hydra.main: root has a console and a file handler; Lightning's rank-zero lines
    (the SMD reports) and warnings must reach both, the console through tqdm.write."""
    from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

    root, lightning = logging.getLogger(), logging.getLogger("pytorch_lightning")
    saved = (root.handlers[:], root.level, lightning.handlers[:], lightning.propagate)
    console_stream = io.StringIO()
    console, file_log = logging.StreamHandler(console_stream), logging.FileHandler(tmp_path / "train.log")
    for handler in (console, file_log):
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    root.handlers[:] = [console, file_log]
    root.setLevel(logging.INFO)
    try:
        route_lightning_logs()
        assert isinstance(root.handlers[0], TqdmHandler) and root.handlers[1] is file_log
        rank_zero_info("SMD: scale-invariant tensors\n  0  model.0.weight")
        rank_zero_warn("a Lightning warning")
    finally:
        root.handlers[:], lightning.handlers[:] = saved[0], saved[2]
        root.setLevel(saved[1])
        lightning.propagate = saved[3]
        logging.captureWarnings(False)
        file_log.close()
    log = (tmp_path / "train.log").read_text()
    for text in (console_stream.getvalue(), log):
        assert "[pytorch_lightning.utilities.rank_zero] SMD: scale-invariant tensors\n  0  model.0.weight" in text
        assert "a Lightning warning" in text


@pytest.mark.slow
def test_piped_cli_run_output_and_train_log(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(TRAIN_PY), "experiment=quickstart_rescale", "trainer.max_epochs=2",
         "scheduler.milestones=[1]", "trainer.limit_train_batches=8", "trainer.limit_val_batches=1",
         "print_config=false", f"hydra.run.dir={run}"],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "\r" not in out and len(out) < 20_000
    assert "will be deleted" not in out  # the CSV logger writes to a fresh version folder
    lines = out.splitlines()
    for marker in ("SMD: scale-invariant tensors", "SMD: step 8: group all lr 0.2 → 0.02",
                   "SMD: equilibrium per learning-rate stage"):
        assert any(line.startswith(marker) for line in lines), marker
    assert not any("SMD" in line and "Epoch" in line for line in lines)
    # issue 26: the SMD start-up report and plan fit a screen, no line is wider than 120 columns,
    # no known third-party noise, no resolved config unless asked
    start = next(i for i, line in enumerate(lines) if line.startswith("SMD: scale-invariant tensors"))
    end = next(i for i in range(start + 1, len(lines))
               if lines[i].startswith(("Epoch", "SMD: step", "`Trainer", "[examples")))
    assert end - start <= 25, "\n".join(lines[start:end])
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    assert "LeafSpec" not in out and "litlogger" not in out and "task_name:" not in out
    assert "model.features.0.weight" in (run / "smd" / "smd_tensors.txt").read_text()
    assert any(line.startswith("[examples/train.py] expected: val/acc swings") for line in lines)
    assert sum(line.startswith("Epoch") for line in lines) <= 12
    log = (run / "train.log").read_text()
    for marker in ("SMD: scale-invariant tensors", "SMD: step 8:", "SMD: equilibrium per learning-rate stage",
                   "`Trainer.fit` stopped"):
        assert marker in log, marker
    assert (run / "version_0" / "metrics.csv").is_file()
