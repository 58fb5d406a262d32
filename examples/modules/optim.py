"""Optimizer / scheduler plumbing shared by the example LightningModules.

The optimizer and the LR scheduler come from the Hydra config as partials
(``_partial_: true``): the module only decides the parameter groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

#: Layers whose own parameters (γ, β) count as "norm" parameters for ``norm_weight_decay``.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def param_groups(
    module: nn.Module,
    norm_weight_decay: float | None = None,
    bias_weight_decay: float | None = None,
    head_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``module`` into named param groups.

    With both overrides ``None`` (the papers' setting) there is a single group ``"all"``
    and the optimizer's ``weight_decay`` applies everywhere. ``norm_weight_decay`` (like
    torchvision's ``--norm-weight-decay``) puts the γ/β of normalization layers in a group
    ``"norm"`` with that decay; ``bias_weight_decay`` does the same for the other biases
    (group ``"bias"``); ``head_weight_decay`` does it for the weight of the output head, the last
    ``nn.Linear`` registered (group ``"head"``; its bias follows ``bias_weight_decay`` when that is
    set). Parameter order inside each group follows ``named_parameters``.
    """
    if norm_weight_decay is None and bias_weight_decay is None and head_weight_decay is None:
        return [{"name": "all", "params": [p for p in module.parameters() if p.requires_grad]}]
    head_ids: set[int] = set()
    if head_weight_decay is not None:
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"model.head_weight_decay={head_weight_decay} is set but {type(module).__name__} has no "
                             "nn.Linear output head; remove the override")
        head_ids.update(id(p) for p in linears[-1].parameters(recurse=False))
    norm_ids: set[int] = set()
    if norm_weight_decay is not None:
        for m in module.modules():
            if isinstance(m, NORM_LAYERS):
                norm_ids.update(id(p) for p in m.parameters(recurse=False))
    groups: dict[str, list[nn.Parameter]] = {"all": [], "norm": [], "bias": [], "head": []}
    seen: set[int] = set()
    for name, p in module.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in norm_ids:
            groups["norm"].append(p)
        elif bias_weight_decay is not None and name.endswith("bias"):
            groups["bias"].append(p)
        elif id(p) in head_ids:
            groups["head"].append(p)
        else:
            groups["all"].append(p)
    out: list[dict[str, Any]] = [{"name": "all", "params": groups["all"]}]
    if groups["norm"]:
        out.append({"name": "norm", "params": groups["norm"], "weight_decay": norm_weight_decay})
    if groups["bias"]:
        out.append({"name": "bias", "params": groups["bias"], "weight_decay": bias_weight_decay})
    if groups["head"]:
        out.append({"name": "head", "params": groups["head"], "weight_decay": head_weight_decay})
    return [g for g in out if g["params"]]


def hidden_matrix_groups(module: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split each param group into a Muon part (``use_muon=True``) and an AdamW part (``False``).

    Muon part: the 2-D weights of the ``nn.Linear`` layers except the last one registered (the
    output head), as torch.optim.Muon's documentation recommends ("hidden layers"); everything else
    (embeddings, the head, biases, norms, conv kernels) goes to AdamW. Group names get ``/muon`` and
    ``/adamw``; empty parts are dropped.
    """
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    hidden = {id(m.weight) for m in linears[:-1] if m.weight.ndim == 2}
    out = []
    for group in groups:
        muon = [p for p in group["params"] if id(p) in hidden]
        rest = [p for p in group["params"] if id(p) not in hidden]
        extra = {k: v for k, v in group.items() if k not in ("params", "name")}
        name = group.get("name", "all")
        if muon:
            out.append({"name": f"{name}/muon", "params": muon, "use_muon": True})
        if rest:
            out.append({**extra, "name": f"{name}/adamw", "params": rest, "use_muon": False})
    return out


class MuonWithAuxAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the groups with ``use_muon=True``, ``torch.optim.AdamW`` on the others.

    One optimizer (Lightning's automatic optimization, one scheduler for both), the pattern of Keller
    Jordan's ``MuonWithAuxAdam``: the groups come from :func:`hidden_matrix_groups` (the example
    modules call it when the config's optimizer is this class). Both inner optimizers share this
    one's ``param_groups`` dicts and ``state``, so schedulers, checkpoints and SMDCallback's rescale
    (which moves ``momentum_buffer``/``exp_avg``/``exp_avg_sq``) see everything. A scheduler scales
    both families' lr by the same factor. ``adamw_*``: the AdamW groups' settings (their
    ``weight_decay`` keeps a group's own override, e.g. ``norm_weight_decay``).
    """

    splits_hidden_matrices = True

    def __init__(self, params: Any, lr: float = 0.02, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, adjust_lr_fn: str | None = None, ns_steps: int = 5,
                 adamw_lr: float = 1e-3, adamw_betas: tuple[float, float] = (0.9, 0.999), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float = 0.0) -> None:
        groups = [dict(g) for g in params]
        if not groups or not all(isinstance(g, dict) and "use_muon" in g for g in groups):
            raise ValueError("MuonWithAuxAdamW needs param groups with a 'use_muon' key "
                             "(examples.modules.optim.hidden_matrix_groups builds them)")
        for g in groups:
            if g["use_muon"]:
                for key, value in dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                       adjust_lr_fn=adjust_lr_fn, ns_steps=ns_steps).items():
                    g.setdefault(key, value)
            else:
                for key, value in dict(lr=adamw_lr, betas=tuple(adamw_betas), eps=adamw_eps,
                                       weight_decay=adamw_weight_decay).items():
                    g.setdefault(key, value)
        super().__init__(groups, {})
        self._bind()

    def _bind(self) -> None:
        muon = [g for g in self.param_groups if g["use_muon"]]
        adamw = [g for g in self.param_groups if not g["use_muon"]]
        self._inner = []
        if muon:
            self._inner.append(torch.optim.Muon(muon))
        if adamw:
            self._inner.append(torch.optim.AdamW(adamw))
        for inner in self._inner:
            inner.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._bind()  # load_state_dict replaced the group dicts and the state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self._inner:
            inner.step()
        return loss


def warmup_multistep(
    optimizer: torch.optim.Optimizer,
    milestones: Sequence[int],
    gamma: float = 0.1,
    warmup_steps: int = 0,
    warmup_factor: float = 1e-3,
) -> torch.optim.lr_scheduler.LambdaLR:
    """MultiStepLR with a linear warm-up (Detectron / torchvision detection recipe).

    The factor rises linearly from ``warmup_factor`` to 1 over ``warmup_steps`` and is
    multiplied by ``gamma`` at each milestone. Use with ``interval: step``.
    """
    milestones = sorted(int(m) for m in milestones)

    def factor(step: int) -> float:
        f = gamma ** sum(step >= m for m in milestones)
        if warmup_steps > 0 and step < warmup_steps:
            alpha = step / warmup_steps
            f *= warmup_factor * (1 - alpha) + alpha
        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_factor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``min_factor`` (use with ``interval: step``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ConfiguredOptimizerModule(pl.LightningModule):
    """Base LightningModule whose optimizer and scheduler are partials from the config.

    Args:
        optimizer: ``functools.partial`` of a ``torch.optim.Optimizer`` (``params`` missing).
        scheduler: optional partial of an LR scheduler (``optimizer`` missing).
        scheduler_interval: ``"epoch"`` or ``"step"``: when Lightning steps the scheduler.
        norm_weight_decay: weight decay of normalization γ/β; ``None`` = optimizer's value.
        bias_weight_decay: weight decay of the other biases; ``None`` = optimizer's value.
        head_weight_decay: weight decay of the output head's weight (the last ``nn.Linear``);
            ``None`` = optimizer's value.
    """

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        norm_weight_decay: float | None = None,
        bias_weight_decay: float | None = None,
        head_weight_decay: float | None = None,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler.interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.norm_weight_decay = norm_weight_decay
        self.bias_weight_decay = bias_weight_decay
        self.head_weight_decay = head_weight_decay

    def optimized_module(self) -> nn.Module:
        """The module whose parameters are optimized (override to restrict)."""
        return self

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("no optimizer given: set the `optimizer` config group (e.g. optimizer=sgd)")
        groups = param_groups(self.optimized_module(), self.norm_weight_decay, self.bias_weight_decay,
                              getattr(self, "head_weight_decay", None))
        if getattr(getattr(self.optimizer_factory, "func", self.optimizer_factory), "splits_hidden_matrices", False):
            groups = hidden_matrix_groups(self.optimized_module(), groups)
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval, "frequency": 1},
        }
