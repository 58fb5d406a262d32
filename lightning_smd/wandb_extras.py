"""Weights & Biases extras for ``SMDCallback``: metric definitions, figures, a per-tensor table.

Every function acts on the ``pytorch_lightning.loggers.WandbLogger`` instances among
``trainer.loggers``, on global rank 0 only, and does nothing when there are none (``wandb`` is
then never imported).

What W&B does with the ``smd/*`` keys (read from wandb 0.31 and its ``wandb-core`` service):

* ``WandbLogger`` defines ``trainer/global_step`` and the glob ``*`` (``step_metric=
  "trainer/global_step"``, ``step_sync=True``) when it creates the run, and its
  ``log_metrics`` adds ``trainer/global_step`` and joins a ``prefix`` with ``-``. So every
  ``smd/*`` series is already plotted against the Lightning step.
* A second glob such as ``smd/*`` cannot carry per-key settings reliably: wandb-core matches
  a new key against its globs in Go map order (random), so ``*`` wins for a random subset of
  keys. Summaries are therefore set with exact ``define_metric`` names; the ``smd/*`` glob
  here only repeats the step metric (same result whichever glob wins).
* In an exact name, an unescaped ``.`` is read as nesting when the summary is configured, so
  a parameter name like ``model.conv1.weight`` must be written ``model\\.conv1\\.weight``.
* The workspace groups panels into sections by the key's first ``/`` segment by default
  (all of ``smd/*`` in one section ``smd``), or, with the workspace setting that groups by
  all segments, by everything before the last ``/`` (``smd/angular_update``,
  ``smd/weight_norm``, …). ``define_metric`` has no say in sections. Figures go to their own
  section ``smd_figures`` and the table to ``smd_summary``.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Mapping

__all__ = ["log_figures", "log_summary_table", "setup", "wandb_key"]

FIGURES_SECTION = "smd_figures"
TABLE_KEY = "smd_summary/layers"
_STEP_METRIC = "trainer/global_step"
_RATIO_KEYS = ("smd/angular_update_ratio/mean", "smd/angular_update_ratio/min", "smd/angular_update_ratio/max")
_GLOBS = ("smd/*", f"{FIGURES_SECTION}/*", "smd_summary/*")
# run object -> metric names already defined on it (a resumed run is a new object: redefined)
_defined: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _wandb_loggers(trainer: Any) -> list[Any]:
    """The trainer's ``WandbLogger`` instances, on global rank 0 only."""
    if not getattr(trainer, "is_global_zero", True):
        return []
    from pytorch_lightning.loggers import WandbLogger

    return [lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, WandbLogger)]


def wandb_key(logger: Any, key: str) -> str:
    """The key W&B sees for ``key`` logged through ``logger`` (its prefix joined with ``-``)."""
    prefix = getattr(logger, "_prefix", "")
    return f"{prefix}{logger.LOGGER_JOIN_CHAR}{key}" if prefix else key


def _escape(name: str) -> str:
    """Exact metric names: an unescaped ``.`` would be read as nesting by the run summary."""
    return name.replace(".", "\\.")


def _step_metric(logger: Any) -> str:
    # WandbLogger logs no trainer/global_step under sync_tensorboard; mirror its own choice
    init = getattr(logger, "_wandb_init", {}) or {}
    return "global_step" if init.get("sync_tensorboard") else _STEP_METRIC


def _define(logger: Any, name: str, **kwargs: Any) -> None:
    run = logger.experiment
    if not callable(getattr(run, "define_metric", None)):
        return
    seen = _defined.setdefault(run, set())
    if name in seen:
        return
    run.define_metric(name, **kwargs)
    seen.add(name)


def setup(trainer: Any) -> None:
    """Define the ``smd/*`` metrics in every ``WandbLogger`` of ``trainer`` (rank 0).

    * ``trainer/global_step`` is the x-axis of ``smd/*``, ``smd_figures/*`` and
      ``smd_summary/*`` (prefix respected). ``WandbLogger`` already does so for ``*`` when it
      creates the run; these globs matter when it attached to an existing run.
    * ``smd/angular_update_ratio/{mean,min,max}`` keep ``min``, ``max`` and ``last`` in the run
      summary. Every other series keeps W&B's default summary, its last value (an explicit
      ``summary="last"`` would turn it into a ``{"last": v}`` dict in the runs table).

    Idempotent; call it again after a resume.
    """
    for logger in _wandb_loggers(trainer):
        step = _step_metric(logger)
        _define(logger, step)
        for glob in _GLOBS:
            _define(logger, wandb_key(logger, glob), step_metric=step, step_sync=True)
        for key in _RATIO_KEYS:
            _define(logger, _escape(wandb_key(logger, key)), step_metric=step, step_sync=True,
                    summary="min,max,last")
def _log(trainer: Any, make: Any, step: int) -> None:
    """``logger.log_metrics(make(logger), step)`` on each WandbLogger: adds the logger prefix
    and ``trainer/global_step`` so media land on the Lightning step axis."""
    for logger in _wandb_loggers(trainer):
        payload = make()
        if payload:
            logger.log_metrics(payload, step=int(step))


def log_figures(trainer: Any, figures: Mapping[str, Path], step: int) -> None:
    """Log each figure file as a ``wandb.Image`` under ``smd_figures/{name}`` at ``step``."""
    if not figures or not _wandb_loggers(trainer):
        return
    import wandb

    _log(trainer, lambda: {f"{FIGURES_SECTION}/{name}": wandb.Image(str(path)) for name, path in figures.items()
                           if Path(path).is_file()}, step)


def log_summary_table(trainer: Any, rows: list[dict[str, Any]], step: int) -> None:
    """Log ``rows`` (:func:`lightning_smd.report.summary_rows`) as a ``wandb.Table`` under
    ``smd_summary/layers`` at ``step``."""
    if not rows or not _wandb_loggers(trainer):
        return
    import wandb

    columns = list(rows[0])

    def make() -> dict[str, Any]:
        data = [[row.get(col) for col in columns] for row in rows]
        return {TABLE_KEY: wandb.Table(columns=columns, data=data)}

    _log(trainer, make, step)
