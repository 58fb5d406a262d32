"""Reductions of per-shard partial sums, and which ranks need to measure at all.

Norms and dot products are sums over elements, so a sharded tensor's value is the sum of its
shards' partial sums: one ``all_reduce(SUM)`` of the stacked ``[K, N]`` tensor per measured step.

* Replicated parameters (single device, DDP, ddp_spawn, multi-node DDP): every rank holds the same
  values; no collective is needed and only global rank 0 measures and logs.
* FSDP2 / ``ModelParallelStrategy``: parameters are ``DTensor``s; sums are reduced over the mesh
  dimensions on which they are sharded (``Shard`` placements); ``Replicate`` dimensions hold copies.
* FSDP1 (``FSDPStrategy`` with ``use_orig_params=True``): parameters are 1-D views of each rank's
  flat shard (possibly empty); sums are reduced over the strategy's process group.

Every rank must call the returned function in the same order: it is only called from hooks that
run on all ranks, never under ``trainer.is_global_zero``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import pytorch_lightning as pl
import torch.distributed as dist
from torch import Tensor

__all__ = ["check_supported", "is_sharded", "make_reduce_fn"]


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def _is_fsdp1(strategy: pl.strategies.Strategy) -> bool:
    return type(strategy).__name__ == "FSDPStrategy" or isinstance(strategy, pl.strategies.FSDPStrategy)


def check_supported(trainer: "pl.Trainer") -> None:
    """Fail early, naming the setting and what to do, where the callback cannot be correct.

    * FSDP1 with ``use_orig_params=False``: the optimizer holds ``FlatParameter``s that concatenate
      many tensors (and their shards); per-tensor Δ and norms cannot be recovered from them.
    * DeepSpeed (ZeRO 1-3): the optimizer holds flattened fp32 partitions, not the module's
      parameters (and Lightning runs DeepSpeed on CUDA only); not supported yet.
    """
    strategy = trainer.strategy
    if type(strategy).__name__ == "DeepSpeedStrategy":
        raise RuntimeError(
            "SMDCallback does not support DeepSpeedStrategy yet: ZeRO keeps the fp32 master weights in "
            "flattened optimizer partitions, so the tensors the callback must follow are not the optimizer's "
            "parameters. Use ModelParallelStrategy (FSDP2, fully_shard) or FSDPStrategy(use_orig_params=True) "
            "for sharded training, or remove SMDCallback from this run."
        )
    flat = _flat_parameter_cls()
    if flat is not None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if any(isinstance(p, flat) for p in group["params"]):
                    raise RuntimeError(
                        "SMDCallback: the optimizer holds FSDP FlatParameters (FSDPStrategy(use_orig_params=False) "
                        "or FSDP(use_orig_params=False)): one flat tensor per wrapped module, so per-tensor angular "
                        "updates and norms cannot be measured. Use FSDPStrategy(use_orig_params=True) (Lightning's "
                        "default) or ModelParallelStrategy with fully_shard (FSDP2)."
                    )


def _flat_parameter_cls():
    try:
        from torch.distributed.fsdp._flat_param import FlatParameter
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return FlatParameter


def is_sharded(strategy: pl.strategies.Strategy, params: Sequence[Tensor]) -> bool:
    """Whether the tracked tensors are split across ranks (so every rank must take part)."""
    dtensor = _dtensor_cls()
    if dtensor is not None and any(isinstance(p, dtensor) for p in params):
        return True
    return _is_fsdp1(strategy) and dist.is_available() and dist.is_initialized()


def make_reduce_fn(strategy: pl.strategies.Strategy, params: Sequence[Tensor]) -> Callable[[Tensor], Tensor] | None:
    """A function summing ``[K, N]`` partial sums across the shards of ``params``, or ``None``."""
    if not is_sharded(strategy, params):
        return None
    dtensor = _dtensor_cls()
    dparams = [p for p in params if dtensor is not None and isinstance(p, dtensor)]
    if dparams:
        if len(dparams) != len(params):
            names = "some tracked tensors are DTensors and some are not"
            raise RuntimeError(f"SMDCallback: {names}; shard all normalized layers with fully_shard or none of them.")
        return _dtensor_reduce_fn(dparams)
    group = getattr(strategy, "process_group", None) or dist.group.WORLD

    def reduce(sums: Tensor) -> Tensor:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        return sums

    return reduce


def _dtensor_reduce_fn(dparams: Sequence[Tensor]) -> Callable[[Tensor], Tensor]:
    from torch.distributed.tensor import Shard

    mesh = dparams[0].device_mesh
    layouts = {(id(p.device_mesh), tuple(p.placements)) for p in dparams}
    if len(layouts) != 1:
        raise RuntimeError(
            "SMDCallback: tracked DTensor parameters differ in device mesh or placements "
            f"({len(layouts)} layouts); shard every normalized layer the same way, or leave the others out "
            "with SMDCallback(exclude=...)."
        )
    (_, placements), = layouts
    shard_dims = [d for d, placement in enumerate(placements) if isinstance(placement, Shard)]
    groups = [mesh.get_group(d) for d in shard_dims]

    def reduce(sums: Tensor) -> Tensor:
        for group in groups:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        return sums

    return reduce
