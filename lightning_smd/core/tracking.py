"""Which parameters the optimizers train, where each lives, and the step recorder for the chosen ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from lightning_smd.core.messages import rank_zero_warn
from torch import Tensor

from lightning_smd.core.detect import clean_name, normalization_parameters
from lightning_smd.core.distributed import is_sharded, make_reduce_fn
from lightning_smd.core.loop import LoopView
from lightning_smd.core.measure import GroupSlice
from lightning_smd.core.shards import unit_of_local_rows
from lightning_smd.core.plan.simulate import group_label
from lightning_smd.core.steps import StepRecorder, choose_mode

__all__ = ["Tracked", "TrackedSet", "group_label", "param_counts", "trainable"]


@dataclass
class Tracked:
    """A trainable parameter and where it lives."""

    name: str
    param: Tensor
    optimizer_index: int
    group_index: int
    norm_affine: bool = False  # γ/β of a normalization layer: never discovered numerically

    @property
    def group_key(self) -> tuple[int, int]:
        return self.optimizer_index, self.group_index


def param_counts(optimizers: Sequence[torch.optim.Optimizer]) -> tuple[int, ...]:
    """How many tensors each param group holds, and how many of them train (``requires_grad``): a
    change means tensors were added (``add_param_group``) or unfrozen (cheap, per batch: no sync)."""
    return tuple(n for opt in optimizers for g in opt.param_groups
                 for n in (len(g["params"]), sum(1 for p in g["params"] if p.requires_grad)))


def trainable(optimizers: Sequence[torch.optim.Optimizer], model: torch.nn.Module,
              owner: str = "SMDCallback") -> list[Tracked]:
    """Every parameter an optimizer updates, with its clean name and (optimizer, group) indices."""
    names = {id(p): clean_name(n) for n, p in model.named_parameters()}
    norm_affine = normalization_parameters(model)
    tracked: list[Tracked] = []
    seen: set[int] = set()
    for oi, optimizer in enumerate(optimizers):
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                name = names.get(id(p))
                if name is None:
                    rank_zero_warn(
                        f"{owner}: optimizer {oi} group {gi} holds a parameter of shape {tuple(p.shape)} "
                        f"that is not a parameter of the {'model' if owner == 'SMDMonitor' else 'LightningModule'}; "
                        "it is not tracked."
                    )
                    continue
                tracked.append(Tracked(name, p, oi, gi, name in norm_affine))
    return tracked


def _unit_rows(chosen: list[Tracked], units: Mapping[str, int]) -> tuple[dict[str, list[int] | None], str | None]:
    """Per sharded tensor, the global unit of each row of its local part, or why there are none."""
    out: dict[str, list[int] | None] = {}
    for t in chosen:
        if not hasattr(t.param, "placements"):
            if t.param.dim() <= 1 and units.get(t.name, 1) > 1:  # FSDP1: 1-D views of a flat shard
                return {}, f"{t.name} is a flattened FSDP1 shard (FSDPStrategy): its rows are not its units"
            continue  # a plain (replicated) tensor: its rows are the whole tensor's
        try:
            out[t.name] = unit_of_local_rows(t.param, units.get(t.name, 1))
        except ValueError as err:
            return {}, f"the rows held on this rank of the sharded tensor {t.name} cannot be located ({err})"
    return out, None


class TrackedSet:
    """The scale-invariant tensors chosen by detection, in measurement order, and their recorder.

    Tensors are ordered by (optimizer, group) then by the optimizer's own order; ``names[i]`` and
    ``groups[i]`` label column ``i`` of the statistics the :class:`StepRecorder` produces.
    """

    def __init__(self, view: LoopView, chosen: list[Tracked], unit_grad_every: int,
                 units: Mapping[str, int] | None = None, channel_every: int = 1, owner: str = "SMDCallback") -> None:
        # units: name → invariance units per tensor (lightning_smd.core.units) for per-unit statistics,
        # taken on the measured step ending each block of channel_every steps; a DTensor's local
        # rows add into their global units (lightning_smd.core.shards), the step's all-reduce sums them
        unit_rows: dict[str, list[int] | None] = {}
        if units is not None and is_sharded([t.param for t in chosen], view.flat_shards):
            unit_rows, why = _unit_rows(chosen, units)
            if why is not None:
                rank_zero_warn(f"{owner}(per_channel=True): {why}; per-channel statistics are not measured "
                               "in this run (per-tensor ones are).")
                units = None
        by_group: dict[tuple[int, int], list[Tracked]] = {}
        for t in chosen:
            by_group.setdefault(t.group_key, []).append(t)
        self.by_group = dict(sorted(by_group.items()))
        slices: list[GroupSlice] = []
        self.names: list[str] = []
        self.groups: list[str] = []
        for (oi, gi), members in self.by_group.items():
            optimizer = view.optimizers[oi]
            params = [m.param for m in members]
            slices.append(GroupSlice(optimizer, gi, params, len(self.names), choose_mode(view.grad_scaler, optimizer, gi, params),
                                     units=[units.get(m.name, 1) for m in members] if units is not None else None,
                                     unit_rows=[unit_rows.get(m.name) for m in members] if unit_rows else None))
            self.names.extend(m.name for m in members)
            self.groups.extend([group_label(view.optimizers, oi, gi)] * len(members))
        params = [p for s in slices for p in s.params]
        # sharded tensors: every rank holds a part of each sum and must take part in the reduction
        self.measure_on_all_ranks = is_sharded(params, view.flat_shards)
        flat_shards, process_group = view.flat_shards, view.process_group
        unit_count = {id(m.param): units.get(m.name, 1) for m in chosen} if units is not None else None

        def make_reduce(params: list[Tensor]):
            counts = [unit_count[id(p)] for p in params] if unit_count is not None else None
            return make_reduce_fn(params, counts, flat_shards=flat_shards, process_group=process_group)

        self.recorder = StepRecorder(slices, make_reduce, unit_grad_every, channel_every) if slices else None
        for t in chosen:
            if float(view.optimizers[t.optimizer_index].param_groups[t.group_index].get("weight_decay", 0.0)) <= 0:
                rank_zero_warn(
                    f"{owner}: {t.name} is scale-invariant but its param group has weight_decay=0: "
                    "it has no equilibrium, its norm grows and its angular update decays."
                )

    def snapshot_note(self) -> str | None:
        """A start-up line naming the param groups measured from a transient copy of ``w_t`` (their
        update cannot be rebuilt from the optimizer's state: Muon, fused kernels, 16-bit weights,
        unknown optimizers), with the copy's size; ``None`` when every group is measured without one."""
        slices = self.recorder.slices if self.recorder is not None else []
        copied = [s for s in slices if s.mode == "snapshot"]
        if not copied:
            return None
        size = sum(p.numel() * p.element_size() for s in copied for p in s.params)
        groups = ", ".join(f"{type(s.optimizer).__name__} group {s.group_index}" for s in copied)
        return (f"SMD: {groups}: the update cannot be rebuilt from the optimizer's state, so measured steps copy "
                f"the tracked weights for the step ({size / 2**20:.1f} MiB, freed after it; nothing is held between steps).")

    def members(self, optimizer_index: int, group_index: int) -> list[Tracked]:
        return self.by_group.get((optimizer_index, group_index), [])

    def names_of(self, group: str) -> list[str]:
        return [n for n, g in zip(self.names, self.groups) if g == group]
