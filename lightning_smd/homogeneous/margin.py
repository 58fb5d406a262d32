"""Normalized and smoothed margins of an L-homogeneous classifier (Lyu & Li 2020; seed 004).

Per example ``i`` the margin ``q_i`` is

* binary (one logit, labels ``y ∈ {−1, +1}``, or ``{0, 1}`` mapped to them): ``q_i = y_i·f(x_i)``;
* multiclass: ``q_i = f_{y_i}(x_i) − max_{j≠y_i} f_j(x_i)``.

With ``ρ = ‖θ‖₂`` and degree ``L``: the normalized margin ``γ̄ = min_i q_i / ρ^L``, which does not
change when θ is rescaled. Lyu & Li's smoothed margin, with the *summed* loss
``𝓛 = Σ_i ℓ_i`` (ICLR 2020, §4.1: ``γ̃ = g(log(1/𝓛))/ρ^L`` for ``ℓ = e^{−f(q)}``, ``g = f⁻¹``;
the table with the source of each case is in docs/homogeneous.md):

* exponential loss, binary ``ℓ = e^{−q}``: ``γ̃ = log(1/𝓛) / ρ^L = −log Σ_i e^{−q_i} / ρ^L``
  (multiclass ``ℓ_i = Σ_{j≠y} e^{−(f_y − f_j)}``: our extension, same formula);
* logistic (binary ``ℓ = log(1 + e^{−q})``) and cross-entropy (multiclass
  ``ℓ_i = log(1 + Σ_{j≠y} e^{−(f_y − f_j)})``): ``γ̃ = −log(e^{𝓛} − 1) / ρ^L``.

γ̃ ≤ γ̄ whenever it is defined; it is reported only once 𝓛 is below the loss of one example at
a zero margin (``𝓛 < 1`` for exponential, ``𝓛 < log 2`` for logistic and cross-entropy: then
every example is classified right, γ̃ > 0 and Lyu & Li's monotonicity applies), else ``None``. Computed in float64 with
log-sum-exp, so it stays exact when 𝓛 is far below float precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MarginStats", "margins", "normalized_margin", "smoothed_margin"]

LOSSES = ("logistic", "exponential")


def _pairwise(logits: Tensor, targets: Tensor) -> Tensor:
    """``[N, K−1]`` (multiclass) or ``[N, 1]`` (binary) margins ``f_y − f_j`` (``y·f``)."""
    logits = logits.detach().double()
    if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1):
        f = logits.reshape(-1)
        t = targets.reshape(-1).to(torch.float64)
        if bool(((t != 0) & (t != 1) & (t != -1)).any()):
            raise ValueError("binary margins need labels in {0, 1} or {-1, +1}")
        y = torch.where(t == 0, -1.0, t)
        return (y * f).unsqueeze(1)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N] or [N, K], got shape {tuple(logits.shape)}")
    n, k = logits.shape
    idx = targets.reshape(-1).long()
    true = logits.gather(1, idx[:, None])
    mask = torch.ones_like(logits, dtype=torch.bool).scatter_(1, idx[:, None], False)
    return (true - logits)[mask].reshape(n, k - 1)


def margins(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example margins ``q_i`` (float64), see the module docstring."""
    return _pairwise(logits, targets).min(dim=1).values


def _log_softplus(z: Tensor) -> Tensor:
    """``log(log(1 + e^z))``, exact for very negative ``z``."""
    return torch.where(z < -30, z, torch.log(torch.nn.functional.softplus(z).clamp_min(1e-300)))


def smoothed_margin(logits: Tensor, targets: Tensor, param_norm: float, degree: float,
                    loss: str = "logistic") -> float | None:
    """Lyu & Li's smoothed normalized margin γ̃ for ``loss`` (``"logistic"`` or ``"exponential"``);
    ``None`` while 𝓛 ≥ 1 (exponential) or ≥ log 2 (logistic / cross-entropy): see the module docstring."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    s = _pairwise(logits, targets)
    per_example = torch.logsumexp(-s, dim=1)  # log Σ_{j≠y} e^{−s_j}
    if loss == "exponential":
        log_total = torch.logsumexp(per_example, dim=0)
        if float(log_total) >= 0.0:  # 𝓛 < 1 ⇔ every term e^{−(f_y − f_j)} < 1: all classified right
            return None
        value = -float(log_total)
    else:
        log_total = torch.logsumexp(_log_softplus(per_example), dim=0)  # log 𝓛
        total = float(torch.exp(log_total))
        if total >= math.log(2):  # 𝓛 < log 2 ⇔ … every example classified right
            return None
        # −log(e^𝓛 − 1) = −log 𝓛 − log(expm1(𝓛)/𝓛)
        value = -float(log_total) - (math.log(math.expm1(total) / total) if total > 0 else 0.0)
    return value / float(param_norm) ** degree


@dataclass(frozen=True)
class MarginStats:
    """Margins of one evaluation: ``normalized`` (γ̄), ``percentiles`` (``{5: …, 50: …}`` of
    ``q_i/ρ^L``), ``smoothed`` (γ̃ or ``None``), ``support_count`` (examples with
    ``q_i < q_min + ln 10``), ``q_min``, ``count``, ``param_norm`` and ``degree``."""

    normalized: float
    percentiles: dict[float, float]
    smoothed: float | None
    support_count: int
    q_min: float
    count: int
    param_norm: float
    degree: float


def normalized_margin(
    logits: Tensor,
    targets: Tensor,
    param_norm: float,
    degree: float,
    *,
    loss: str = "logistic",
    percentiles: Sequence[float] = (5, 50),
) -> MarginStats:
    """γ̄ = ``min_i q_i / ρ^L`` and its companions, from the logits of a (sub)set of examples.

    Args:
        logits: ``[N]`` / ``[N, 1]`` (binary) or ``[N, K]``.
        targets: labels (binary: ``{0,1}`` or ``{−1,+1}``; multiclass: class indices).
        param_norm: ρ, ``‖θ‖₂`` over the homogeneous parameters
            (:func:`~lightning_smd.homogeneous.scaling.param_norm`).
        degree: L (:func:`~lightning_smd.homogeneous.degree.homogeneity_degree`).
        loss: which smoothed margin (``"logistic"``: logistic / cross-entropy; ``"exponential"``).
    """
    if not param_norm > 0:
        raise ValueError(f"param_norm must be > 0, got {param_norm}")
    q = margins(logits, targets)
    scale = float(param_norm) ** degree
    q_min = float(q.min())
    pct = torch.quantile(q / scale, torch.tensor([p / 100 for p in percentiles], dtype=torch.float64))
    return MarginStats(
        normalized=q_min / scale,
        percentiles={p: float(v) for p, v in zip(percentiles, pct)},
        smoothed=smoothed_margin(logits, targets, param_norm, degree, loss),
        support_count=int((q < q_min + math.log(10)).sum()),
        q_min=q_min,
        count=int(q.numel()),
        param_norm=float(param_norm),
        degree=float(degree),
    )
