"""Hydra entry point of the lightning_smd examples.

    python examples/train.py experiment=quickstart
    python examples/train.py experiment=cifar10_resnet18_sgd data.root=/data/cifar10
    python examples/train.py -m experiment=quickstart smd.rescale=false,true

Composes data, model, optimizer, scheduler, trainer, strategy, smd, logger and callbacks
(``conf/``), checks the values, and fits. Everything a run writes lands in the Hydra run
dir: ``.hydra/`` (config), ``config_resolved.yaml``, ``train.log``, ``version_0/metrics.csv``, ``smd/``
(figures).
:func:`train` is importable and takes a composed config (see tests/test_examples_*.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `python examples/train.py` puts examples/ first, not the repo
    sys.path.insert(0, str(_ROOT))

import hydra  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only  # noqa: E402

from examples import resolvers  # noqa: E402,F401  (registers ${linear_lr:...}, ${wandb_offline_default:})
from examples.console import progress_bar_for, route_lightning_logs, silence_known_noise  # noqa: E402
from examples.data.common import DatasetError  # noqa: E402
from examples.threads import pin_torch_threads  # noqa: E402
from examples.validate import ConfigError, check_cli_overrides, check_data, validate_config  # noqa: E402


def _enabled(node: Any) -> bool:
    return node is not None and bool(node.get("_target_")) and node.get("enabled", True) is not False


def user_config(cfg: DictConfig) -> DictConfig:
    """The config without the ``hydra`` node."""
    out = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    return out


@rank_zero_only
def print_config(cfg: DictConfig) -> None:
    """Print the resolved config (rank 0)."""
    print(OmegaConf.to_yaml(user_config(cfg), resolve=True), flush=True)


@rank_zero_only
def save_config(cfg: DictConfig, output_dir: Path) -> None:
    """Write ``config_resolved.yaml`` next to the logs (Hydra's .hydra/ keeps the unresolved one)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(user_config(cfg), output_dir / "config_resolved.yaml", resolve=True)


#: Keys of the data / model configs that describe them (read by validation and by
#: interpolation) and are passed to the ``_target_`` only when its signature takes them.
META_KEYS = ("task", "channels", "num_classes", "image_size", "in_channels")


def instantiate_node(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate(node)`` without the :data:`META_KEYS` its ``_target_`` does not take."""
    import inspect

    from hydra.utils import get_class

    spec = OmegaConf.to_container(node, resolve=True)
    params = inspect.signature(get_class(spec["_target_"]).__init__).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in META_KEYS:
        if key in spec and key not in params and not takes_all:
            spec.pop(key)
    return instantiate(spec, **kwargs)


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The DataModule of ``cfg.data``."""
    return instantiate_node(cfg.data)


def build_module(cfg: DictConfig) -> pl.LightningModule:
    """The LightningModule of ``cfg.model`` with the optimizer / scheduler partials."""
    optimizer = instantiate(cfg.optimizer)
    sched = OmegaConf.to_container(cfg.get("scheduler") or {}, resolve=True)
    interval = sched.pop("interval", "epoch")
    scheduler = instantiate(sched) if sched.get("_target_") else None
    return instantiate_node(cfg.model, optimizer=optimizer, scheduler=scheduler, scheduler_interval=interval)


def build_strategy(cfg: DictConfig) -> Any:
    """A Strategy instance from ``cfg.strategy._target_``, or its ``name`` string (``auto``)."""
    node = cfg.get("strategy")
    if node is None:
        return "auto"
    if node.get("_target_"):
        return instantiate(node, _convert_="all")
    return node.get("name", "auto")


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """``cfg.callbacks`` (checkpoint only with checkpointing on) + the SMDCallback of ``cfg.smd``."""
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if not _enabled(node):
            continue
        if name == "checkpoint" and not cfg.trainer.get("enable_checkpointing", True):
            continue
        callbacks.append(instantiate(node, _convert_="all"))
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(cb, pl.callbacks.ProgressBar) for cb in callbacks):
        bar = progress_bar_for()  # stdout not a terminal: a few whole lines per epoch
        if bar is not None:
            callbacks.append(bar)
    if _enabled(cfg.get("smd")):
        smd = OmegaConf.to_container(cfg.smd, resolve=True)
        smd.pop("enabled", None)
        callbacks.append(instantiate(smd, _convert_="all"))
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Any]:
    """Every enabled logger of ``cfg.logger``."""
    return [instantiate(node, _convert_="all") for node in (cfg.get("logger") or {}).values() if _enabled(node)]


def build_plugins(cfg: DictConfig) -> list[Any]:
    """``SLURMEnvironment(auto_requeue=False)`` under submitit, which requeues itself."""
    from hydra.core.hydra_config import HydraConfig

    launcher = ""
    if HydraConfig.initialized():
        launcher = str(OmegaConf.select(HydraConfig.get(), "launcher._target_", default="") or "")
    if "submitit" in launcher.lower() or os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        from pytorch_lightning.plugins.environments import SLURMEnvironment

        return [SLURMEnvironment(auto_requeue=False)]
    return []


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg``, build everything, fit, and return what the run produced.

    Returns a dict with ``metrics`` (final ``trainer.callback_metrics`` as floats),
    ``global_step``, ``output_dir``, ``figures_dir`` (SMD figures, or None), ``metrics_csv``
    (or None) and ``checkpoint`` (last checkpoint path, or None).

    Raises:
        ConfigError: a bad value (the message names the key).
        DatasetError: the dataset is not where the config points, or does not fit it (damaged files,
            other classes, too few samples for one batch); raised before the model is built.
    """
    validate_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("print_config", False):
        print_config(cfg)
    threads = torch.get_num_threads()
    try:
        pin_torch_threads(cfg.get("torch_threads"))  # null: the CPUs this process may use
        return _train(cfg, output_dir)
    finally:
        torch.set_num_threads(threads)  # train() is also called in-process (tests, notebooks)


def _train(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True)

    datamodule = build_datamodule(cfg)
    check_data(datamodule, cfg)  # missing / damaged / mismatched data: a clear error before the model is built
    module = build_module(cfg)

    wandb_mode = os.environ.get("WANDB_MODE")  # WandbLogger(offline=True) sets it process-wide
    loggers = build_loggers(cfg)
    trainer_kwargs: dict[str, Any] = {}
    if not cfg.get("validate", True):
        trainer_kwargs.update(limit_val_batches=0, num_sanity_val_steps=0)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        strategy=build_strategy(cfg),
        callbacks=build_callbacks(cfg),
        logger=loggers or False,
        plugins=build_plugins(cfg) or None,
        **trainer_kwargs,
    )
    hparams = OmegaConf.to_container(user_config(cfg), resolve=True)
    for lg in loggers:
        lg.log_hyperparams(hparams)
    save_config(cfg, output_dir)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    finally:
        _finish_wandb(loggers)
        if wandb_mode is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = wandb_mode

    metrics_csv = None
    for lg in loggers:
        if isinstance(lg, pl.loggers.CSVLogger):
            metrics_csv = str(Path(lg.log_dir) / "metrics.csv")
            break
    ckpt = next((cb.last_model_path for cb in trainer.callbacks
                 if isinstance(cb, pl.callbacks.ModelCheckpoint) and cb.last_model_path), None)
    result = {
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1},
        "global_step": int(trainer.global_step),
        "output_dir": str(output_dir),
        "figures_dir": cfg.smd.get("figures_dir") if _enabled(cfg.get("smd")) else None,
        "metrics_csv": metrics_csv,
        "checkpoint": ckpt,
    }
    rank_zero_info(f"[examples/train.py] run dir: {output_dir}")
    if cfg.get("expected"):
        rank_zero_info(f"[examples/train.py] expected: {' '.join(str(cfg.expected).split())}")
    return result


def _finish_wandb(loggers: list[Any]) -> None:
    """WandbLogger.finalize does not call wandb.finish(): do it so files are flushed."""
    if any(isinstance(lg, pl.loggers.WandbLogger) for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """CLI: compose with Hydra, then :func:`train`. Config/data errors exit with status 2."""
    route_lightning_logs()  # Lightning's lines through Hydra's handlers: own lines, and train.log
    silence_known_noise()  # two third-party lines no user can act on (examples/console.py: KNOWN_NOISE)
    try:
        result = train(cfg)
    except (ConfigError, DatasetError) as err:
        print(f"\n[examples/train.py] error: {err}\n", file=sys.stderr, flush=True)
        sys.exit(2)
    metric = cfg.get("optimized_metric")
    return result["metrics"].get(metric) if metric else None


if __name__ == "__main__":
    try:
        check_cli_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"\n[examples/train.py] error: {err}\n", file=sys.stderr, flush=True)
        sys.exit(2)
    main()
