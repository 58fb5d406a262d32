"""Noisy Rayleigh Quotient (SMD_THEORY.md §5): the model where the SMD theory is exact."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from examples.modules.optim import ConfiguredOptimizerModule


class NoisyRayleighQuotient(ConfiguredOptimizerModule):
    """Parameter ``X ∈ R^p``; loss ``½·X̃ᵀAX̃ + σ·εᵀX̃`` with ``X̃ = X/‖X‖``, fresh ``ε ~ N(0, I)``.

    ``A = diag(a_1 ≤ … ≤ a_p)`` with eigenvalues evenly spaced in ``[a_min, a_max]``. The
    gradient ``(1/‖X‖)·P(AX̃ + σε)`` is exactly orthogonal to ``X``, so ``X`` is
    scale-invariant and, with SGD + weight decay, ``Δ* = sqrt(2λη)`` and ``‖X‖⁴ →
    (p − 1)σ²η/(2λ)`` (noise-dominated regime). Logged: ``train/risk`` = ``½X̃ᵀAX̃`` and
    ``train/risk_excess`` = risk − ½a_1 (distance to the minimum). The batch (a step index)
    is ignored: pair with :class:`examples.data.nrq.StepIndexDataModule`.

    Args:
        dim: p.
        sigma: noise scale σ.
        a_min, a_max: smallest / largest eigenvalue of A (``a_min ≥ 0``).
        init_norm: ‖X_0‖ (the direction is Gaussian, drawn from ``init_seed``).
        init_seed: seed of the initial direction (independent of the global seed).
    """

    def __init__(
        self,
        dim: int = 100,
        sigma: float = 1.0,
        a_min: float = 0.0,
        a_max: float = 1.0,
        init_norm: float = 1.0,
        init_seed: int = 0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        norm_weight_decay: float | None = None,
        bias_weight_decay: float | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval, norm_weight_decay, bias_weight_decay)
        if dim < 2:
            raise ValueError(f"model.dim must be ≥ 2, got {dim}")
        if a_min < 0 or a_max < a_min:
            raise ValueError(f"need 0 ≤ model.a_min ≤ model.a_max, got a_min={a_min}, a_max={a_max}")
        if init_norm <= 0:
            raise ValueError(f"model.init_norm must be > 0, got {init_norm}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.sigma = float(sigma)
        g = torch.Generator().manual_seed(init_seed)
        x0 = torch.randn(dim, generator=g, dtype=torch.float64)
        self.X = nn.Parameter((x0 / x0.norm() * init_norm).float())
        self.register_buffer("A", torch.linspace(a_min, a_max, dim))

    def risk(self) -> torch.Tensor:
        """½·X̃ᵀAX̃ (noise-free Rayleigh quotient)."""
        xn = self.X / self.X.norm()
        return 0.5 * (self.A * xn * xn).sum()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        xn = self.X / self.X.norm()
        risk = 0.5 * (self.A * xn * xn).sum()
        eps = torch.randn_like(xn)
        loss = risk + self.sigma * (eps * xn).sum()
        self.log("train/loss", loss)
        self.log("train/risk", risk.detach(), prog_bar=True)
        self.log("train/risk_excess", risk.detach() - 0.5 * self.A[0])
        self.log("train/x_norm", self.X.detach().norm())
        return loss
