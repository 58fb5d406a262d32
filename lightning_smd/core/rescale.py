"""Learning-rate changes and the rescale that puts scale-invariant weights at their new equilibrium.

When a param group's (η, λ) becomes (η', λ'), the equilibrium ‖w*‖ moves by ((η'λ)/(ηλ'))^e
(SMD_THEORY §4, ``docs/optimizer_theory.md`` §5): e = 1/4 for SGD/SGDM/Nesterov (‖w*‖² = sqrt(Lη/2λ)),
e = 1/2 for AdamW/Lion/Muon (scale-free update, ‖w*‖ = ηū/Δ* ∝ sqrt(η/λ)). Multiplying the group's
scale-invariant tensors by ``f = ((η'λ)/(ηλ'))^e`` puts them there at once instead of after
``log(k)(1 − α)/(4λη')`` (SGD family) or ``log(k)/(2λ'η')`` (decoupled) steps.

Optimizer state: since ``∇L(f·w) = ∇L(w)/f``, state built from gradients lives on the old scale.
We move it to the new one: first moments (``momentum_buffer``, ``exp_avg``) are multiplied by
``1/f`` and second moments (``exp_avg_sq``, ``max_exp_avg_sq``) by ``1/f²``, so the first step after
the rescale already turns the weights by the new Δ* (for SGD with momentum: Δ = η'‖v/f‖/(f‖w‖) =
Δ_old/√k with f = k^(−1/4), exactly the new Δ*). The weight-decay part of a momentum buffer is
then off by f² for about 1/(1 − α) steps; it is radial and does not change the angle.

The fixed factor k^(-e) is exact only when the weights are at equilibrium before the change
(SMD paper §5.2, Noisy Rayleigh Quotient §3.2): it keeps the ratio Δ_t/Δ* (Δ ∝ 1/‖w‖² for SGD, 1/‖w‖ for AdamW)
so weights at 0.2 Δ* stay at 0.2 of the new Δ*. ``rescale="equilibrium"`` (mode ``"equilibrium"``
here, factors per tensor in :class:`lightning_smd.core.schedule.ScheduleWatcher`) moves each tensor to
its predicted new equilibrium norm instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from lightning_smd.core.detect import clean_name
from lightning_smd.core.measure import local
from lightning_smd.core.options import RESCALE_MODES, RescaleMode, check

__all__ = ["FIRST_MOMENT_KEYS", "SECOND_MOMENT_KEYS", "RescalePolicy", "rescale_", "rescale_averaged_models"]

FIRST_MOMENT_KEYS = frozenset({"momentum_buffer", "exp_avg"})
SECOND_MOMENT_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq"})
MODES = RESCALE_MODES


@dataclass(frozen=True)
class RescalePolicy:
    """Which (η, λ) changes trigger a rescale, and by how much.

    Args:
        mode: ``"drop"``: only changes that divide η/λ by at least ``min_drop`` (the paper's
            multi-stage schedules: StepLR, MultiStepLR, ReduceLROnPlateau); ``"continuous"``: every
            change (cosine, polynomial, OneCycle decay), with η clamped from below at
            ``min_lr_ratio`` × the group's largest η seen, so η → 0 cannot collapse the weights
            (the cumulative factor stays ≥ ``min_lr_ratio^e``, e = 1/4 or 1/2 by family).
            ``"equilibrium"``: the same changes as ``"drop"``, but the watcher moves each tensor to its
            own predicted new equilibrium norm ‖w*'‖ (from the running L, or for AdamW/Lion the
            measured update length) instead of multiplying by this factor, which is then only the
            fallback for tensors whose estimate is not known yet (see ``ScheduleWatcher``).
        min_drop: ratio threshold of ``"drop"`` and ``"equilibrium"`` mode.
        on_increase: also rescale when ηλ grows (warmup, cyclic schedules); off by default.
    """

    mode: RescaleMode = "drop"
    min_drop: float = 2.0
    min_lr_ratio: float = 1e-3
    on_increase: bool = False

    def __post_init__(self) -> None:
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        check("RescalePolicy", "mode", isinstance(self.mode, str) and self.mode in MODES, f"must be one of {MODES}", self.mode)
        check("RescalePolicy", "min_drop", number(self.min_drop) and self.min_drop > 1,
              "must be a number > 1 (the factor by which η·λ must drop to rescale; 2 = halved)", self.min_drop)
        check("RescalePolicy", "min_lr_ratio", number(self.min_lr_ratio) and 0 < self.min_lr_ratio <= 1,
              "must be a number in (0, 1]", self.min_lr_ratio)
        check("RescalePolicy", "on_increase", isinstance(self.on_increase, bool), "must be True or False",
              self.on_increase)

    def factor(self, old: tuple[float, float], new: tuple[float, float], peak_lr: float,
               exponent: float = 0.25) -> float | None:
        """The rescale factor ``k^(-exponent)`` for ``(lr, weight_decay)`` going from ``old`` to ``new``, or ``None``.

        ``exponent``: the family's e in ‖w*‖ ∝ (η/λ)^e (:func:`lightning_smd.theory.norm_exponent`):
        1/4 for SGD/SGDM/Nesterov, 1/2 for AdamW/Lion/Muon, whose update does not scale with ‖w‖.
        """
        (lr_old, wd_old), (lr_new, wd_new) = old, new
        if min(lr_old, lr_new, wd_old, wd_new) <= 0 or not all(map(math.isfinite, (lr_old, lr_new, wd_old, wd_new))):
            return None
        if self.mode == "continuous":
            floor = self.min_lr_ratio * peak_lr
            lr_old, lr_new = max(lr_old, floor), max(lr_new, floor)
        drop = (lr_old * wd_new) / (lr_new * wd_old)  # k: how much the equilibrium ‖w*‖⁴ shrinks
        if math.isclose(drop, 1.0, rel_tol=1e-12):
            return None
        if drop < 1 and not self.on_increase:
            return None
        if self.mode != "continuous" and max(drop, 1 / drop) < self.min_drop:
            return None
        return drop**-exponent


@torch.no_grad()
def rescale_(
    params: Iterable[Tensor],
    factor: float,
    optimizer: torch.optim.Optimizer | None = None,
    scale_grads: bool = False,
) -> set[str]:
    """Multiply ``params`` (their local shards) by ``factor`` and move their optimizer state along.

    ``scale_grads``: also divide existing gradients by ``factor`` (a rescale between backward and
    the optimizer step, e.g. a scheduler stepped inside ``training_step``). Returns the names of
    param-shaped optimizer state entries that were left unchanged because their scaling is unknown.
    """
    params = list(params)
    torch._foreach_mul_([local(p) for p in params], factor)
    untouched: set[str] = set()
    for p in params:
        if scale_grads and p.grad is not None:
            local(p.grad).mul_(1.0 / factor)
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for key, value in state.items():
            if not isinstance(value, Tensor) or value.shape != p.shape:
                continue
            if key in FIRST_MOMENT_KEYS:
                local(value).mul_(1.0 / factor)
            elif key in SECOND_MOMENT_KEYS:
                local(value).mul_(1.0 / factor**2)
            else:
                untouched.add(key)
    return untouched


def rescale_averaged_models(callbacks: Iterable[Any], names: list[str], factor: float) -> int:
    """Rescale the matching tensors of EMA/SWA copies kept by weight-averaging callbacks.

    Their averages would otherwise mix weights from both sides of the rescale, weighting the
    larger, older ones more. Returns how many averaged models were rescaled.
    """
    wanted = set(names)
    count = 0
    for cb in callbacks:
        averaged = getattr(cb, "_average_model", None)
        # Lightning's WeightAveraging/EMAWeightAveraging: a torch AveragedModel around the module;
        # its StochasticWeightAveraging: a deepcopy of the LightningModule itself (same names)
        if isinstance(averaged, torch.optim.swa_utils.AveragedModel):
            averaged = averaged.module
        if not isinstance(averaged, torch.nn.Module):
            continue
        params = [p for n, p in averaged.named_parameters() if clean_name(n) in wanted]
        if params:
            rescale_(params, factor)
            count += 1
    return count
