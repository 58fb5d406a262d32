"""Console output of the examples: log lines never glued to a progress bar, few bar lines in logs.

* :func:`route_lightning_logs`: Lightning's loggers (``pytorch_lightning``, ``lightning_fabric``,
  where ``rank_zero_info`` writes, hence the SMD detection report, plan and summaries) and
  Python warnings go to the root logger, so Hydra's handlers print them on their own lines and
  write them to ``<run dir>/train.log``; console handlers write through ``tqdm.write``.
* :class:`LineProgressBar`: when stdout is not a terminal (a pipe, a batch job's log), the
  training bar prints a few whole lines per epoch instead of hundreds of ``\\r`` redraws.
* :func:`silence_known_noise`: the example scripts (never the library) drop two third-party lines
  every run prints and no user can act on: Lightning's ``isinstance(treespec, LeafSpec)``
  FutureWarning (torch 2.14 deprecates what Lightning 2.6 still calls) and its litlogger tip.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

__all__ = ["KNOWN_NOISE", "LineProgressBar", "TqdmHandler", "progress_bar_for", "route_lightning_logs",
           "silence_known_noise"]

#: (what, regex of the message) of third-party lines the examples drop; each is matched exactly
KNOWN_NOISE = (
    ("FutureWarning from pytorch_lightning/utilities/_pytree.py (torch 2.14)", r"`isinstance\(treespec, LeafSpec\)`"),
    ("Lightning's litlogger advert", r"💡 Tip: For seamless cloud logging"),
)


class _DropKnownNoise(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        import re

        self.patterns = [re.compile(pattern) for _, pattern in KNOWN_NOISE]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def silence_known_noise() -> None:
    """For the example scripts' own process: ignore :data:`KNOWN_NOISE` (one exact warning
    message, one exact log line). Called by ``examples/train.py``'s CLI, not by :func:`train`
    (tests and notebooks keep every warning), and never by the library."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    noise = _DropKnownNoise()
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(noise)


#: console lines longer than this are wrapped (train.log keeps them whole)
CONSOLE_WIDTH = 120


def wrap_lines(text: str, width: int = CONSOLE_WIDTH) -> str:
    """Every line of ``text`` longer than ``width`` wrapped at spaces, continuation lines indented."""
    import textwrap

    out = []
    for line in text.split("\n"):
        if len(line) <= width:
            out.append(line)
            continue
        indent = " " * (len(line) - len(line.lstrip(" ")))
        out += textwrap.wrap(line, width, subsequent_indent=indent + "    ", break_long_words=True,
                             break_on_hyphens=False)
    return "\n".join(out)


class TqdmHandler(logging.StreamHandler):
    """A console handler that writes with ``tqdm.write``: an active bar is cleared first and
    redrawn after, so a log line never lands on a bar's line. Lines wider than
    :data:`CONSOLE_WIDTH` (a warning's one long sentence) are wrapped."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(wrap_lines(self.format(record)), file=self.stream)
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


def route_lightning_logs() -> None:
    """Send Lightning's log records and Python warnings through the root logger's handlers.

    Lightning adds its own stderr handler (and stops propagation) when it is imported before
    logging is configured, which is always the case under ``@hydra.main``: its lines then miss
    Hydra's ``train.log`` and interleave with the progress bar. Console ``StreamHandler`` s of the
    root logger become :class:`TqdmHandler` s (same stream, level and format).
    """
    root = logging.getLogger()
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    for i, handler in enumerate(list(root.handlers)):
        if type(handler) is logging.StreamHandler:
            replacement = TqdmHandler(handler.stream)
            replacement.setLevel(handler.level)
            replacement.setFormatter(handler.formatter)
            root.handlers[i] = replacement
    logging.captureWarnings(True)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font-cache chatter


class _LineStream:
    """File-like wrapper for tqdm: drops its redraws, except while ``armed``, when the status is
    written as one whole line."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.encoding = getattr(stream, "encoding", "utf-8")
        self.armed = False

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line and self.armed:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


class LineProgressBar(TQDMProgressBar):
    """The training bar for a stdout that is not a terminal: about ``lines_per_epoch`` whole lines
    per epoch (and one at its end); no sanity-check or validation bars.

    Args:
        lines_per_epoch: how many times per epoch the bar prints a line.
    """

    def __init__(self, lines_per_epoch: int = 4) -> None:
        super().__init__(refresh_rate=1, leave=True)
        self.lines_per_epoch = max(int(lines_per_epoch), 1)

    @property
    def refresh_rate(self) -> int:
        total = self.total_train_batches if self._trainer is not None else None
        if not isinstance(total, int) or total <= 0:  # unknown or infinite epoch length
            return 50
        return max(1, math.ceil(total / self.lines_per_epoch))

    def _bar(self, desc: str, disable: bool) -> Tqdm:
        stream = _LineStream(sys.stdout)
        bar = Tqdm(desc=desc, position=0, disable=disable or self.is_disabled, leave=True, dynamic_ncols=False,
                   ncols=100, file=stream, smoothing=0, mininterval=0, bar_format=self.BAR_FORMAT)
        bar.line_stream = stream  # tqdm wraps its file
        return bar

    def init_sanity_tqdm(self) -> Tqdm:
        return self._bar(self.sanity_check_description, disable=True)

    @staticmethod
    def _print(bar: Tqdm | None) -> None:
        """Write the bar's status as one line (its other redraws are dropped)."""
        stream = getattr(bar, "line_stream", None)
        if bar is None or bar.disable or stream is None:
            return
        stream.armed = True
        try:
            bar.refresh()
        finally:
            stream.armed = False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n, bar = batch_idx + 1, self.train_progress_bar
        if bar is not None and n != bar.total and self._should_update(n, bar.total):
            self._print(bar)  # the epoch's last line comes at its end, with the validation metrics

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            self._print(bar)
        super().on_train_epoch_end(trainer, pl_module)

    def init_train_tqdm(self) -> Tqdm:
        return self._bar(self.train_description, disable=False)

    def init_validation_tqdm(self) -> Tqdm:
        return self._bar(self.validation_description, disable=True)

    def init_test_tqdm(self) -> Tqdm:
        return self._bar("Testing", disable=False)

    def init_predict_tqdm(self) -> Tqdm:
        return self._bar(self.predict_description, disable=False)


def progress_bar_for(stream: Any = None) -> LineProgressBar | None:
    """A :class:`LineProgressBar` when ``stream`` (default: stdout) is not a terminal, else None
    (Lightning's own bar)."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return None if callable(isatty) and isatty() else LineProgressBar()
