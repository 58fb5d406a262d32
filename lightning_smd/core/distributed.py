"""Reductions of per-shard partial sums, and which ranks need to measure at all.

Norms and dot products are sums over elements, so a sharded tensor's value is the sum of its
shards' partial sums: one ``all_reduce(SUM)`` of the stacked ``[K, N]`` tensor per measured step
and layout group (one group for FSDP2 and HSDP; FSDP × TP adds one per other sharding), a few
floats per tracked tensor whatever the model size.

* Replicated parameters (single device, DDP, ddp_spawn, multi-node DDP): every rank holds the same
  values; no collective is needed and only global rank 0 measures and logs.
* FSDP2 / HSDP / tensor parallelism (``ModelParallelStrategy``): parameters are ``DTensor``s; each
  tensor's sums are reduced over the mesh dimensions on which it is sharded (``Shard``, and
  ``_StridedShard`` under FSDP × TP); ``Replicate`` dimensions hold copies and are not summed.
  Tensors are grouped by the ranks their shards live on: one ``all_reduce`` per group and measured
  step, in the same order on every rank (:class:`LayoutReduce`).
* FSDP1 (``FSDPStrategy`` with ``use_orig_params=True``): parameters are 1-D views of each rank's
  flat shard (possibly empty); sums are reduced over the strategy's process group.

Every rank must call the returned function in the same order: it is only called from hooks that
run on all ranks, never on rank 0 alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["LayoutReduce", "check_flat_parameters", "is_sharded", "make_reduce_fn"]


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def check_flat_parameters(optimizers: Sequence[torch.optim.Optimizer], owner: str = "SMDCallback") -> None:
    """Refuse FSDP1 ``FlatParameter``s (``use_orig_params=False``): one flat tensor per wrapped module,
    whose per-tensor angular updates and norms cannot be recovered."""
    flat = _flat_parameter_cls()
    if flat is None:
        return
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if any(isinstance(p, flat) for p in group["params"]):
                raise RuntimeError(
                    f"{owner}: the optimizer holds FSDP FlatParameters (FSDPStrategy(use_orig_params=False) "
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


def is_sharded(params: Sequence[Tensor], flat_shards: bool = False) -> bool:
    """Whether the tracked tensors are split across ranks (so every rank must take part):
    ``DTensor``s, or ``flat_shards`` (the loop's parameters are views of flat FSDP1 shards)."""
    dtensor = _dtensor_cls()
    if dtensor is not None and any(isinstance(p, dtensor) for p in params):
        return True
    return flat_shards and dist.is_available() and dist.is_initialized()


def make_reduce_fn(params: Sequence[Tensor], units: Sequence[int] | None = None, *, flat_shards: bool = False,
                   process_group: Any = None) -> Callable[[Tensor], Tensor] | None:
    """A function summing ``[K, N]`` partial sums across the shards of ``params``, or ``None``.

    Column ``j < len(params)`` of the argument holds partial sums of ``params[j]``; with ``units``
    (per-unit statistics), the argument may go on with ``units[j]`` columns per tensor, in order.
    Under DTensor layouts each column is summed over the ranks that hold the *other shards of its
    tensor* (see :class:`LayoutReduce`); under FSDP1 (``flat_shards``) over ``process_group``.
    """
    if not is_sharded(params, flat_shards):
        return None
    dtensor = _dtensor_cls()
    if dtensor is not None and any(isinstance(p, dtensor) for p in params):
        return LayoutReduce(params, units)
    group = process_group or dist.group.WORLD

    def reduce(sums: Tensor) -> Tensor:
        sums = sums.contiguous()  # a collective on a strided view reduces its storage's first numel elements
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        return sums

    return reduce


# ----------------------------------------------------------------------------- DTensor layouts
def _placement_kind(placement: Any) -> str:
    """``"replicate"``, ``"shard"`` (``Shard`` and ``_StridedShard``: FSDP over TP) or ``"partial"``."""
    if placement.is_replicate():
        return "replicate"
    if placement.is_partial():
        return "partial"
    return "shard"  # Shard(d), _StridedShard(d, sf) (not a Shard subclass, is_shard() is False) and the like


def _shard_dims(param: Tensor) -> tuple[int, ...]:
    """The mesh dimensions (of size > 1) over which ``param``'s elements are split."""
    mesh = param.device_mesh
    dims = []
    for d, placement in enumerate(param.placements):
        kind = _placement_kind(placement)
        if kind == "partial":
            raise RuntimeError(
                f"SMD: a tracked parameter has a Partial placement ({param.placements}); parameters must be "
                "sharded or replicated on every mesh dimension."
            )
        if kind == "shard" and mesh.size(d) > 1:
            dims.append(d)
    return tuple(dims)


@dataclass
class _Group:
    """Tracked tensors whose shards live on the same ranks: one all-reduce over ``process_groups``."""

    key: tuple  # global ranks summed over (this rank's group), the same partition of columns on every rank
    columns: list[int]
    process_groups: list[Any]  # one group, or (no flattened group available) one per mesh dimension
    description: str = ""
    _index: dict = field(default_factory=dict)  # device -> LongTensor of columns

    def index(self, device: torch.device) -> Tensor:
        index = self._index.get(device)
        if index is None:
            index = self._index[device] = torch.tensor(self.columns, dtype=torch.long, device=device)
        return index


def _process_groups(mesh: Any, dims: tuple[int, ...]) -> list[Any]:
    """Process groups whose ranks hold the shards of a tensor sharded over mesh ``dims``: one
    group (the mesh dimension's, or the flattened group of several) wherever possible."""
    if len(dims) == 1:
        return [mesh.get_group(dims[0])]
    names = mesh.mesh_dim_names
    if names:
        # a collective (new_group) the first time, cached by the root mesh afterwards: make_reduce_fn
        # runs on every rank, in the same order
        try:
            sub = mesh if len(dims) == mesh.ndim else mesh[tuple(names[d] for d in dims)]
            return [sub._flatten().get_group()]
        except Exception:  # noqa: BLE001 - private API, or a name clash: reduce dimension by dimension
            pass
    return [mesh.get_group(d) for d in dims]


def _group_ranks(mesh: Any, dims: tuple[int, ...]) -> tuple[int, ...]:
    """Global ranks of this rank's shard group: same coordinates as this rank outside ``dims``."""
    coordinate = mesh.get_coordinate()
    ranks = mesh.mesh
    index = tuple(slice(None) if d in dims else coordinate[d] for d in range(mesh.ndim))
    return tuple(sorted(int(r) for r in ranks[index].reshape(-1).tolist()))


class LayoutReduce:
    """Sums ``[K, N]`` partial sums of DTensor parameters, each column over its own tensor's shards.

    Tensors are grouped by the ranks their shards live on (equal meshes compare equal, whatever
    object they are: ``fully_shard`` without ``mesh=`` builds a new one per call; different
    placements on the same ranks, e.g. column- and row-wise tensor parallelism under FSDP, share a
    group). Per call: one ``all_reduce(SUM)`` per group that spans more than one rank, in the order
    of the groups' first columns (the same on every rank); replicated dimensions are never summed
    over, so replicas (HSDP's replicate dimension, TP-replicated tensors) are not double counted.
    Plain tensors mixed in (a module left unsharded) are replicated: their columns are kept.

    With one group (FSDP2, HSDP: every tracked tensor sharded the same way) the argument is reduced
    in place (a contiguous copy of a strided one), whatever its number of columns; with several, ``N``
    must be ``len(params)``, or ``len(params) + sum(units)`` where the per-unit columns of each tensor
    follow (``units[j]`` of them for ``params[j]``, reduced with it). Use the returned tensor.
    """

    def __init__(self, params: Sequence[Tensor], units: Sequence[int] | None = None) -> None:
        dtensor = _dtensor_cls()
        self.num_columns = len(params)
        self.units = list(units) if units is not None else None
        by_key: dict[tuple, _Group] = {}
        for j, p in enumerate(params):
            if dtensor is None or not isinstance(p, dtensor):
                continue  # replicated: nothing to sum
            mesh, dims = p.device_mesh, _shard_dims(p)
            if not dims:
                continue
            ranks = _group_ranks(mesh, dims)
            group = by_key.get(ranks)
            if group is None:
                group = by_key[ranks] = _Group(ranks, [], _process_groups(mesh, dims),
                                               f"{tuple(p.placements)} on mesh dims {dims}")
            group.columns.append(j)
        self.groups: list[_Group] = sorted(by_key.values(), key=lambda g: g.columns[0])
        # with per-unit columns: each group also reduces its tensors' unit columns
        self._with_units: list[_Group] = []
        if self.units is not None and len(self.units) == self.num_columns:
            starts, at = [], self.num_columns
            for k in self.units:
                starts.append(at)
                at += k
            self._with_units = [_Group(g.key, g.columns + [starts[j] + u for j in g.columns for u in range(self.units[j])],
                                       g.process_groups, g.description) for g in self.groups]
        self.calls = 0  # how many times this function ran (collectives = calls × collectives_per_call)

    @property
    def collectives_per_call(self) -> int:
        return sum(len(g.process_groups) for g in self.groups)

    def __call__(self, sums: Tensor) -> Tensor:
        self.calls += 1
        if not self.groups:
            return sums
        if len(self.groups) == 1 and len(self.groups[0].columns) == self.num_columns:
            # every column reduced the same way: in place, on a contiguous tensor (gloo and NCCL reduce
            # a strided view's storage, e.g. a column slice of a wider buffer, as if it were contiguous)
            sums = sums.contiguous()
            for pg in self.groups[0].process_groups:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=pg)
            return sums
        groups = self.groups
        if self._with_units and sums.shape[-1] == self.num_columns + sum(self.units or ()):
            groups = self._with_units
        elif sums.shape[-1] != self.num_columns:
            raise RuntimeError(
                f"SMD: partial sums of {sums.shape[-1]} tensors given to the reduction of {self.num_columns} "
                f"tracked tensors in {len(self.groups)} layouts; the columns cannot be matched to their layouts."
            )
        for group in groups:
            index = group.index(sums.device)
            chunk = sums.index_select(-1, index)
            for pg in group.process_groups:
                dist.all_reduce(chunk, op=dist.ReduceOp.SUM, group=pg)
            sums.index_copy_(-1, index, chunk)
        return sums

    def __repr__(self) -> str:
        parts = ", ".join(f"{len(g.columns)} tensors over ranks {list(g.key)}" for g in self.groups)
        return f"LayoutReduce({self.num_columns} columns: {parts or 'replicated'})"
