"""Where results go on rank 0: every logger of the Trainer, the compact record history, figures and W&B extras."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lightning_smd.lightning.namespace import is_kind

from lightning_smd.report import channel_figures, figures as report, wandb_extras
from lightning_smd.core.channels import ChannelMetrics
from lightning_smd.report.history import History
from lightning_smd.report.series import RunSeries

if TYPE_CHECKING:  # annotations only: the engine runs without Lightning (SMDMonitor)
    import pytorch_lightning as pl

__all__ = ["Publisher", "check_writable", "log_dir"]


def log_dir(trainer: pl.Trainer) -> str | None:
    """``trainer.log_dir`` without its broadcast: safe inside rank-zero-only code."""
    loggers = trainer.loggers
    if not loggers:
        return None
    logger = loggers[0]
    if is_kind(logger, "TensorBoardLogger", "CSVLogger"):
        return logger.log_dir
    return logger.save_dir


def check_writable(directory: str | Path, argument: str) -> None:
    """Create ``directory`` and write a probe file in it now, so a bad path fails before training."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".smd_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{argument}: cannot write figures to {str(path)!r} ({err}); pass a writable directory.") from err


class Publisher:
    """Logs metric dicts through every logger (keeping :attr:`records`, what the figures are drawn
    from) and renders the figures into ``figures_dir`` (default ``<log dir>/smd``). Rank 0 only.

    ``channels``: the per-channel metrics; after a step that built them (at most once per
    ``histogram_every`` steps), :meth:`log` also sends their per-layer histograms to TensorBoard and W&B, and :meth:`render_figures` draws the
    per-channel figures (:mod:`lightning_smd.report.channel_figures`).
    """

    def __init__(self, figures_dir: str | None = None, channels: ChannelMetrics | None = None,
                 histogram_every: int = 50) -> None:
        self.figures_dir = figures_dir
        self.records = History()
        self.channels = channels
        # per-layer histograms at most once per this many steps (each is a write per layer and logger)
        self.histogram_every = histogram_every
        self._histogram_step: int | None = None

    def log(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        self.records.append(step, metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.channels is not None and self.channels.fresh:
            self.channels.fresh = False
            if self._histogram_step is None or step - self._histogram_step >= self.histogram_every:
                self._histogram_step = step
                channel_figures.log_histograms(trainer, self.channels, step)

    @staticmethod
    def writes_files(trainer: pl.Trainer) -> bool:
        """``False`` under ``fast_dev_run``: Lightning suppresses logging and checkpointing there
        (its ``DummyLogger``), and the callback writes nothing either: no plan, no figures."""
        return not trainer.fast_dev_run

    def plan_path(self, trainer: pl.Trainer) -> Path | None:
        """Where the plan's CSV goes: next to the figures when there is a logger or an explicit
        ``figures_dir``; ``None`` (not written) for a logger-less run or under ``fast_dev_run``."""
        if not self.writes_files(trainer) or (self.figures_dir is None and not trainer.loggers):
            return None
        return self.figures_path(trainer) / "plan.csv"

    def figures_path(self, trainer: pl.Trainer) -> Path:
        if self.figures_dir is not None:
            return Path(self.figures_dir)
        # not trainer.log_dir: it broadcasts (a collective) and this runs on rank 0 only
        return Path(log_dir(trainer) or trainer.default_root_dir) / "smd"

    def render_figures(self, trainer: pl.Trainer, summary_table: bool = False) -> dict[str, Path]:
        """Write the figures and hand them, and at the end the per-layer table, to W&B."""
        if not self.writes_files(trainer):
            return {}
        series = RunSeries.from_records(self.records)
        figures = report.save_figures(series, self.figures_path(trainer))
        figures.update(channel_figures.save_channel_figures(self.channels, self.figures_path(trainer)))
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        wandb_extras.log_figures(trainer, figures, step)
        wandb_extras.log_concern_charts(trainer, series, step)
        if summary_table:
            wandb_extras.log_summary_table(trainer, report.summary_rows(series), step)
        return figures
