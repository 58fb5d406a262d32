"""Where the rows of a sharded tensor's local part sit in the whole tensor, and so which invariance unit each belongs to.

Per-unit statistics are sums over the rows of dim 0 that make up each unit. A ``DTensor``'s local
part holds some of those rows (``Shard(0)`` under FSDP2 and HSDP, column-wise tensor parallelism,
``_StridedShard(0)`` under FSDP × TP: several non-adjacent blocks), or every row with part of each
(``Shard(1)``, row-wise tensor parallelism). Each rank adds its rows' partial sums into the columns
of their *global* units, and the one all-reduce of the step's stacked sums (which sums each tensor
over the ranks holding its shards) completes them: no second read and no extra collective.

Torch only. Reads the placements the way torch's own ``compute_local_shape_and_global_offset``
applies them: left to right over the mesh dimensions, each splitting what the previous ones left.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["local_rows", "unit_of_local_rows"]


def local_rows(param: Tensor) -> list[int] | None:
    """The global dim-0 indices of the rows ``param.to_local()`` holds, in order; ``None`` for a plain
    tensor (its rows are the whole tensor's). Raises ``ValueError`` for placements it cannot read."""
    placements = getattr(param, "placements", None)
    if placements is None:
        return None
    mesh: Any = param.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError("this rank is not part of the tensor's device mesh")
    index = torch.arange(param.shape[0]) if param.dim() else torch.zeros(1, dtype=torch.long)
    for mesh_dim, placement in enumerate(placements):
        if placement.is_replicate() or placement.is_partial() or getattr(placement, "dim", None) != 0:
            continue  # a copy, or a split of another dim: every row stays, holding part of its elements
        split = getattr(placement, "_split_tensor", None)
        if split is None:
            raise ValueError(f"placement {placement} cannot be read")
        shards, _ = split(index, mesh.size(mesh_dim), with_padding=False)
        at = coordinate[mesh_dim]
        index = shards[at] if at < len(shards) else index[:0]
    local_shape = param.to_local().shape
    if param.dim() and int(index.numel()) != (local_shape[0] if len(local_shape) else 1):
        raise ValueError(f"placements {tuple(placements)}: {index.numel()} rows computed, the local part has "
                         f"{local_shape[0] if len(local_shape) else 0}")
    return index.tolist()


def unit_of_local_rows(param: Tensor, units: int) -> list[int] | None:
    """The unit (``0 .. units-1``, each ``shape[0] / units`` consecutive rows of dim 0) of every row of
    ``param``'s local part; ``None`` for a plain tensor."""
    rows = local_rows(param)
    if rows is None:
        return None
    per_unit = max(int(param.shape[0]) // units, 1) if param.dim() else 1
    return [r // per_unit for r in rows]
