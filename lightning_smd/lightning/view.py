"""The Trainer read once per hook: the :class:`~lightning_smd.core.loop.LoopView` the engine gets.

Everything the engine needs of a Lightning Trainer is read here, with the Lightning-only knowledge
(strategies recognised by class name in either namespace, the precision plugin's scaler,
``fit_loop``'s logging step, ``lr_scheduler_configs``); the parts below never see the Trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_smd.core.distributed import check_flat_parameters
from lightning_smd.core.loop import FitHorizon, LoopView, ScheduledLR

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = ["check_supported", "log_step_of", "view_of"]


def log_step_of(trainer: pl.Trainer) -> int:
    """Lightning's logging step: optimizer steps taken so far (the axis ``self.log`` uses)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def _is_fsdp1(strategy: Any) -> bool:
    return any(cls.__name__ == "FSDPStrategy" for cls in type(strategy).__mro__)  # either Lightning namespace


def _grad_scaler(trainer: pl.Trainer) -> Any | None:
    """The enabled ``GradScaler`` (or ``ShardedGradScaler``) of the precision plugin, if any."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    return scaler


def _horizon(trainer: pl.Trainer) -> FitHorizon:
    configs = list(getattr(trainer, "lr_scheduler_configs", []) or [])
    max_steps = getattr(trainer, "max_steps", -1)
    try:
        batches = float(getattr(trainer, "num_training_batches", float("inf")))
    except (TypeError, ValueError):
        batches = float("inf")
    module = trainer.lightning_module
    return FitHorizon(
        schedulers=[ScheduledLR(c.scheduler, getattr(c, "interval", "step"), getattr(c, "frequency", 1),
                                bool(getattr(c, "reduce_on_plateau", False)), getattr(c, "monitor", None),
                                getattr(c, "strict", True), getattr(c, "name", None)) for c in configs],
        max_steps=-1 if max_steps is None else int(max_steps),
        max_epochs=getattr(trainer, "max_epochs", None),
        batches_per_epoch=batches,
        accumulate_grad_batches=max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1),
        automatic_optimization=bool(getattr(module, "automatic_optimization", True)),
        keep=(trainer, module),
    )


def view_of(trainer: pl.Trainer, horizon: bool = False) -> LoopView:
    """The loop as the engine sees it now (``horizon``: with the schedulers and the run's length, for the plan)."""
    strategy = trainer.strategy
    return LoopView(
        optimizers=trainer.optimizers,
        model=trainer.lightning_module,
        global_step=trainer.global_step,
        log_step=log_step_of(trainer),
        log_every_n_steps=max(int(trainer.log_every_n_steps), 1),
        global_rank=trainer.global_rank,
        world_size=trainer.world_size,
        broadcast=strategy.broadcast,
        flat_shards=_is_fsdp1(strategy),
        process_group=getattr(strategy, "process_group", None),
        grad_scaler=_grad_scaler(trainer),
        precision=str(getattr(trainer, "precision", "32-true")),
        averaged_models=trainer.callbacks,
        horizon=_horizon(trainer) if horizon else None,
    )


def check_supported(trainer: pl.Trainer, owner: str = "SMDCallback") -> None:
    """Fail early, naming the setting and what to do, where the callback cannot be correct.

    * FSDP1 with ``use_orig_params=False``: the optimizer holds ``FlatParameter``s that concatenate
      many tensors (and their shards); per-tensor Δ and norms cannot be recovered from them.
    * DeepSpeed (ZeRO 1-3): the optimizer holds flattened fp32 partitions, not the module's
      parameters (and Lightning runs DeepSpeed on CUDA only); not supported yet.
    """
    if type(trainer.strategy).__name__ == "DeepSpeedStrategy":
        raise RuntimeError(
            f"{owner} does not support DeepSpeedStrategy yet: ZeRO keeps the fp32 master weights in "
            "flattened optimizer partitions, so the tensors the callback must follow are not the optimizer's "
            "parameters. Use ModelParallelStrategy (FSDP2, fully_shard) or FSDPStrategy(use_orig_params=True) "
            f"for sharded training, or remove {owner} from this run."
        )
    check_flat_parameters(trainer.optimizers, owner)
