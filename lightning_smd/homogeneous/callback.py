"""``HomogeneousCallback``: the homogeneous-network measurements in a Lightning Trainer.

A thin adapter over :func:`~lightning_smd.homogeneous.measure.measure_homogeneous`. It reads
only what every Lightning Trainer has (``loggers``, ``global_step``, ``current_epoch``,
``is_global_zero``, ``train_dataloader``, ``log_dir``) and calls ``logger.log_metrics`` by
name, so the same callback runs in ``pytorch_lightning`` and ``lightning.pytorch`` Trainers
(hooks are called by name; nothing is checked with ``isinstance`` against one namespace).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lightning_smd.homogeneous import figures
from lightning_smd.homogeneous.degree import Homogeneity, homogeneity_degree
from lightning_smd.homogeneous.measure import collect, default_split, measure_homogeneous
from lightning_smd.homogeneous.pruning import DEFAULT_FRACTIONS, pruning_curve

__all__ = ["HomogeneousCallback", "NotHomogeneousWarning"]


class NotHomogeneousWarning(UserWarning):
    """The measured network is not homogeneous: no margin is logged."""


class HomogeneousCallback(pl.Callback):
    """Normalized margin, smoothed margin and relative sparsity of a homogeneous network.

    Measures at the end of every ``every_n_epochs``-th training epoch and at the end of training,
    in eval mode and without gradients (the model's modes and the RNG state are restored, so
    training is unchanged), over ``data`` (default: the Trainer's training dataloader) bounded
    to ``max_samples`` examples. Logs through every logger of the Trainer, at
    ``step=trainer.global_step``:

    * ``homogeneous/degree``, ``homogeneous/param_norm``;
    * ``homogeneous/normalized_margin``, ``homogeneous/smoothed_margin`` (once defined),
      ``homogeneous/margin/{p05,p50}``, ``homogeneous/support_count``;
    * ``homogeneous/relative_sparsity/{lt_1e-1,lt_1e-2,lt_1e-3}/{layer}`` for the EWN/SWN layers
      (``sparsity_layers="all"``: every Linear/Conv), ``homogeneous/min_relative_norm/{layer}``,
      the smallest r_u of the layer, and ``homogeneous/layer_norm/{layer}``, the layer's ‖W‖.

    At fit start the network's homogeneity is checked (:func:`homogeneity_degree`). A network that
    is not homogeneous gets one :class:`NotHomogeneousWarning` naming the tensors that break it,
    and no degree or margin is logged at all.

    At the end of training it computes the pruning curve, draws the figures
    (``homogeneous_margin.png``, ``homogeneous_sparsity.png``, ``homogeneous_pruning.png``) in
    ``figures_dir`` (default ``<log dir>/<prefix>``) and, with ``verbose``, prints the numbers.

    Args:
        every_n_epochs: measure every this many training epochs (≥ 1).
        data: an iterable of batches to measure on (e.g. a DataLoader over the training set);
            ``None``: the Trainer's training dataloader.
        max_samples: at most this many examples per measurement (``None``: all of ``data``).
        max_batches: at most this many batches of ``data`` per measurement (``None``: no limit;
            ``1`` with a full-batch loader: the whole training set once).
        module: dotted name of the sub-module to measure (``"net"``); ``None``: the LightningModule.
        split: ``batch → (x, y)``; default: ``batch[0], batch[1]`` (or ``x``/``y`` keys).
        loss: which smoothed margin: ``"logistic"`` (logistic / cross-entropy) or ``"exponential"``.
        sparsity_layers: ``"normalized"`` (EWN/SWN layers), ``"all"`` or ``"none"``.
        pruning_fractions: fractions of each hidden layer's units for the pruning curve (``None``: skip).
        tolerance: relative tolerance of the homogeneity verdict.
        prefix: metric key prefix; keep ``"homogeneous"`` (the public keys) unless two callbacks
            measure two sub-modules of one run.
        figures_dir: where the figures go; ``False``: no figures.
        verbose: print the measured numbers at the end of training (rank 0).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        data: Iterable[Any] | None = None,
        max_samples: int | None = 4096,
        max_batches: int | None = None,
        module: str | None = None,
        split: Callable[[Any], tuple[Tensor, Tensor]] = default_split,
        loss: str = "logistic",
        sparsity_layers: str = "normalized",
        pruning_fractions: Sequence[float] | None = DEFAULT_FRACTIONS,
        tolerance: float = 1e-3,
        prefix: str = "homogeneous",
        figures_dir: str | Path | bool | None = None,
        verbose: bool = True,
    ) -> None:
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"HomogeneousCallback(every_n_epochs=...) must be an integer ≥ 1, got {every_n_epochs!r}")
        if loss not in ("logistic", "exponential"):
            raise ValueError(f"HomogeneousCallback(loss=...) must be 'logistic' or 'exponential', got {loss!r}")
        if sparsity_layers not in ("normalized", "all", "none"):
            raise ValueError(f"HomogeneousCallback(sparsity_layers=...) must be 'normalized', 'all' or 'none', got {sparsity_layers!r}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"HomogeneousCallback(max_samples=...) must be ≥ 1 or None, got {max_samples!r}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"HomogeneousCallback(max_batches=...) must be ≥ 1 or None, got {max_batches!r}")
        self.every_n_epochs = every_n_epochs
        self.data = data
        self.max_samples = max_samples
        self.max_batches = max_batches
        self.module_name = module
        self.split = split
        self.loss = loss
        self.sparsity_layers = sparsity_layers
        self.pruning_fractions = tuple(pruning_fractions) if pruning_fractions is not None else None
        self.tolerance = tolerance
        self.prefix = prefix
        self.figures_dir = figures_dir
        self.verbose = verbose
        self.homogeneity: Homogeneity | None = None
        #: ``[(step, metrics)]`` of every measurement of this fit (what the figures show)
        self.history: list[tuple[int, dict[str, float]]] = []
        #: ``fraction → accuracy`` at the end of training (``None`` before)
        self.pruning: dict[float, float] | None = None
        self.figures: dict[str, Path] = {}
        #: ``layer → min_u r_u`` at the last measurement (the smallest relative unit norm: it moves
        #: long before a threshold of the relative-sparsity keys is crossed)
        self.min_relative_norm: dict[str, float] = {}
        self._last_step: int | None = None

    # -- what is measured ------------------------------------------------------------------------
    def _target(self, pl_module: nn.Module) -> nn.Module:
        if self.module_name is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module_name)
        except AttributeError as err:
            raise ValueError(f"HomogeneousCallback(module={self.module_name!r}): {type(pl_module).__name__} has no "
                             f"such sub-module ({err})") from err

    def _batches(self, trainer: Any, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        data = self.data if self.data is not None else trainer.train_dataloader
        if data is None:
            raise ValueError("HomogeneousCallback: no data to measure on; pass data=<DataLoader>")
        with torch.random.fork_rng(devices=[]):  # iterating a shuffling loader draws from the global RNG
            if self.max_batches is not None:
                data = itertools.islice(data, self.max_batches)
            return collect(data, self.max_samples, device, self.split)

    # -- Lightning hooks --------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        restored, self._restored = getattr(self, "_restored", None), None  # a resume keeps its history
        self.history = restored or []
        self.pruning, self.figures, self.homogeneity = None, {}, None
        self._last_step = self.history[-1][0] if self.history else None
        self._target(pl_module)  # a bad module name fails before training

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        target = self._target(pl_module)
        batches = self._batches(trainer, pl_module.device)
        if not batches:
            raise ValueError("HomogeneousCallback: the measurement data is empty")
        modes = [(m, m.training) for m in target.modules()]
        target.eval()
        try:
            self.homogeneity = homogeneity_degree(target, batches[0][0][:256], tolerance=self.tolerance)
        finally:
            for m, training in modes:
                m.training = training
        if trainer.is_global_zero:
            name = self.module_name or type(pl_module).__name__
            if self.homogeneity.homogeneous:
                self._print(f"HomogeneousCallback: {name} is {self.homogeneity.message()}")
            else:
                warnings.warn(f"HomogeneousCallback: {name} is {self.homogeneity.message()}\n"
                              "No degree and no margin will be logged.", NotHomogeneousWarning, stacklevel=2)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._measure(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # not on_fit_end: the loggers are finalized before it runs
        if self._last_step != trainer.global_step:
            self._measure(trainer, pl_module)
        target = self._target(pl_module)
        if self.pruning_fractions is not None and len(self._layers(target)) > 0:
            batches = self._batches(trainer, pl_module.device)
            modes = [(m, m.training) for m in target.modules()]
            target.eval()
            try:
                self.pruning = pruning_curve(target, batches, self.pruning_fractions)
            finally:
                for m, training in modes:
                    m.training = training
        if trainer.is_global_zero:
            try:
                self._render(trainer)
            except Exception as err:  # a figure must never cost the run
                warnings.warn(f"HomogeneousCallback: could not draw the figures ({type(err).__name__}: {err})",
                              stacklevel=2)
            if self.verbose:
                self._print(self.summary())

    @staticmethod
    def _layers(target: nn.Module) -> list[str]:
        from lightning_smd.homogeneous.pruning import default_layers

        return default_layers(target)

    def _measure(self, trainer: Any, pl_module: Any) -> None:
        target = self._target(pl_module)
        batches = self._batches(trainer, pl_module.device)
        if not batches:
            return
        reuse = self.homogeneity if self.homogeneity is not None and not self.homogeneity.homogeneous else None
        metrics, result = measure_homogeneous(target, batches, homogeneity=reuse, loss=self.loss,
                                              sparsity_layers=self.sparsity_layers, prefix=self.prefix)
        if self.homogeneity is not None and self.homogeneity.homogeneous and not result.homogeneous:
            warnings.warn(f"HomogeneousCallback: at step {trainer.global_step} the network is {result.message()}\n"
                          "No margin is logged for this measurement.", NotHomogeneousWarning, stacklevel=2)
        head = f"{self.prefix}/min_relative_norm/"
        self.min_relative_norm = {k[len(head):]: v for k, v in metrics.items() if k.startswith(head)}
        step = int(trainer.global_step)
        self._last_step = step
        self.history.append((step, metrics))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # -- outputs ------------------------------------------------------------------------------------
    def _figures_path(self, trainer: Any) -> Path | None:
        if self.figures_dir is False:
            return None
        if self.figures_dir not in (None, True):
            return Path(self.figures_dir)
        loggers = trainer.loggers
        base = None
        if loggers:
            base = getattr(loggers[0], "log_dir", None) or getattr(loggers[0], "save_dir", None)
        return Path(base or trainer.default_root_dir) / self.prefix

    def _render(self, trainer: Any) -> None:
        path = self._figures_path(trainer)
        if path is None:
            return
        label = {"": self.history}
        drawn = {
            "margin": figures.plot_margin(label, path / "homogeneous_margin.png", self.prefix),
            "sparsity": figures.plot_sparsity(label, path / "homogeneous_sparsity.png", self.prefix),
            "pruning": figures.plot_pruning({"": self.pruning} if self.pruning else {}, path / "homogeneous_pruning.png"),
        }
        self.figures = {k: v for k, v in drawn.items() if v is not None}

    def summary(self) -> str:
        """The measured numbers (what the figures show), as text."""
        p = self.prefix
        lines = [f"HomogeneousCallback ({p}): {len(self.history)} measurements"]
        if self.homogeneity is not None and not self.homogeneity.homogeneous:
            lines.append("  not homogeneous: no margin measured")
        lines.append(f"  {'step':>7} {'ρ=‖θ‖':>10} {'γ̄ (normalized)':>16} {'γ̃ (smoothed)':>15} {'p05':>11} {'p50':>11} {'support':>8}")
        for step, m in self.history:
            def fmt(key: str, spec: str = ".4e") -> str:
                return format(m[key], spec) if key in m else "—"
            lines.append(f"  {step:>7} {fmt(f'{p}/param_norm', '.4g'):>10} {fmt(f'{p}/normalized_margin'):>16} "
                         f"{fmt(f'{p}/smoothed_margin'):>15} {fmt(f'{p}/margin/p05'):>11} {fmt(f'{p}/margin/p50'):>11} "
                         f"{fmt(f'{p}/support_count', '.0f'):>8}")
        if self.history:
            last = self.history[-1][1]
            sparsity = {k: v for k, v in last.items() if k.startswith(f"{p}/relative_sparsity/")}
            if sparsity:
                lines.append("  relative sparsity at the last measurement (fraction of units with r_u < t):")
                lines += [f"    {k[len(p) + 19:]}: {v:.3f}" for k, v in sparsity.items()]
        if self.min_relative_norm:
            lines.append("  smallest relative unit norm min_u r_u per layer: "
                         + ", ".join(f"{k}: {v:.3g}" for k, v in self.min_relative_norm.items()))
        if self.pruning:
            lines.append("  pruning curve (fraction of each hidden layer's smallest units zeroed → accuracy):")
            lines.append("    " + "  ".join(f"{f:.0%}→{a:.3f}" for f, a in self.pruning.items()))
        if self.figures:
            lines.append("  figures: " + ", ".join(str(v) for v in self.figures.values()))
        return "\n".join(lines)

    @staticmethod
    def _print(text: str) -> None:
        print(text, flush=True)

    # -- checkpoint ---------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # one instance per measured sub-module / prefix may coexist in a Trainer
        return self._generate_state_key(prefix=self.prefix, module=self.module_name)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [(s, dict(m)) for s, m in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = [(int(s), dict(m)) for s, m in state_dict.get("history", [])]
