"""Homogeneous networks of the margin / EWN-vs-SWN examples (seeds 003 and 004).

:func:`homogeneous_mlp`: a bias-free ReLU MLP (a bias in the first layer only, if asked: it
keeps the network homogeneous), optionally with EWN or SWN on every layer. Its degree is the
number of Linear layers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

from examples.modules.optim import ConfiguredOptimizerModule
from lightning_smd.parametrizations import exp_weight_norm

WEIGHT_NORMS = ("none", "ewn", "swn")


def homogeneous_mlp(in_features: int, widths: Sequence[int], num_outputs: int, weight_norm: str = "none",
                    first_bias: bool = False, seed: int = 0, init_scale: float = 1.0) -> nn.Sequential:
    """``Flatten → [Linear → ReLU] × len(widths) → Linear``, biases off (except the first layer's
    with ``first_bias``), PyTorch's default init from ``seed`` times ``init_scale``;
    ``weight_norm`` ∈ none / ewn / swn."""
    if weight_norm not in WEIGHT_NORMS:
        raise ValueError(f"model.weight_norm must be one of {WEIGHT_NORMS}, got {weight_norm!r}")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for i, width in enumerate(widths):
            layers += [nn.Linear(d, width, bias=first_bias and i == 0), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, num_outputs, bias=first_bias and not widths))
        with torch.no_grad():
            for p in nn.Sequential(*layers).parameters():
                p.mul_(init_scale)
    finally:
        torch.random.set_rng_state(gen_state)
    net = nn.Sequential(*layers)
    return apply_weight_norm(net, weight_norm)


def apply_weight_norm(net: nn.Module, weight_norm: str) -> nn.Module:
    """EWN (:func:`~lightning_smd.parametrizations.exp_weight_norm`) or SWN (torch's
    ``weight_norm`` parametrization) on the weight of every Linear layer, per output unit."""
    if weight_norm != "none":
        wrap = exp_weight_norm if weight_norm == "ewn" else torch_weight_norm
        for module in list(net.modules()):
            if isinstance(module, nn.Linear):
                wrap(module, "weight", dim=0)
    return net


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:  # binary, one logit: logistic loss
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), y.float())
    return F.cross_entropy(logits, y)


LOSSES = ("logistic", "exponential")


def _log_softplus(z: torch.Tensor) -> torch.Tensor:
    """``log(log(1 + e^z))``, exact and differentiable for very negative ``z`` (where the
    softplus underflows): there it is ``z + log(log1p(u)/u) ≈ z − u/2`` with ``u = e^z < 2e-9``."""
    low = z < -20
    z_hi = torch.where(low, torch.zeros_like(z), z)  # safe inputs: no inf/nan in the unused branch
    z_lo = torch.where(low, z, torch.full_like(z, -20.0))
    return torch.where(low, z_lo - 0.5 * torch.exp(z_lo), torch.log(F.softplus(z_hi)))


def log_mean_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "logistic") -> torch.Tensor:
    """``log 𝓛̄``, the log of the mean training loss, computed in log space so that it stays finite
    (and its gradient ``∇𝓛̄/𝓛̄`` exact) when 𝓛̄ itself is far below float precision.

    Per example, with the margins ``s_j = f_y − f_j`` (``j ≠ y``; one logit: ``s = y·f``,
    ``y ∈ {−1, +1}``): ``exponential``: ``ℓ = Σ_j e^{−s_j}``; ``logistic``:
    ``ℓ = log(1 + Σ_j e^{−s_j})`` (the logistic loss, or the cross-entropy with several logits).
    """
    if loss not in LOSSES:
        raise ValueError(f"model.loss must be one of {LOSSES}, got {loss!r}")
    if logits.shape[-1] == 1:
        neg_margins = (-(2.0 * y.to(logits.dtype) - 1.0) * logits.squeeze(-1)).unsqueeze(-1)
    else:
        true = logits.gather(1, y[:, None])
        mask = torch.ones_like(logits, dtype=torch.bool).scatter_(1, y[:, None], False)
        neg_margins = (logits - true)[mask].reshape(len(y), -1)
    per_example = torch.logsumexp(neg_margins, dim=1)  # log Σ_j e^{−s_j}
    if loss == "logistic":
        per_example = _log_softplus(per_example)
    return torch.logsumexp(per_example, dim=0) - math.log(len(y))


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    pred = (logits.squeeze(-1) > 0).long() if logits.shape[-1] == 1 else logits.argmax(-1)
    return (pred == y).float().mean()


class HomogeneousClassifier(ConfiguredOptimizerModule):
    """A :func:`homogeneous_mlp` classifier: cross-entropy, or the logistic loss with one logit
    when ``num_classes == 2``. Logs ``train/loss``, ``train/acc``, ``val/acc``.

    Args:
        num_classes, in_channels, image_size: from the data config (inputs are flattened).
        widths: hidden widths. weight_norm: ``none`` / ``ewn`` / ``swn``.
        first_bias: a bias in the first layer (keeps the network homogeneous).
        init_seed: seed of the initial weights.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8,
                 widths: Sequence[int] = (64, 64), weight_norm: str = "none", first_bias: bool = False,
                 init_seed: int = 0, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, scheduler_interval: str = "epoch",
                 norm_weight_decay: float | None = None, bias_weight_decay: float | None = None) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval, norm_weight_decay, bias_weight_decay)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        outputs = 1 if num_classes == 2 else num_classes
        self.net = homogeneous_mlp(in_channels * image_size * image_size, list(widths), outputs, weight_norm,
                                   first_bias, init_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = _loss(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", _accuracy(logits, y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", _accuracy(self(x), y), prog_bar=True)


class WeightNormComparison(ConfiguredOptimizerModule):
    """Two copies of one :func:`homogeneous_mlp` (same initial weights ``w``), one under EWN
    (``nets.ewn``) and one under SWN (``nets.swn``), trained side by side on the same batches.

    The loss is the sum of the two networks' losses; their parameters are disjoint, so each gets
    exactly the gradient it would get alone, and the optimizer (SGD) updates each as if alone.
    Logs ``train/loss_ewn``, ``train/loss_swn`` (the mean training loss), ``train/log_loss_ewn``,
    ``train/log_loss_swn`` (its natural log: still finite when the loss underflows) and
    ``val/acc_ewn``, ``val/acc_swn``.

    Args:
        loss: ``"logistic"`` (logistic / cross-entropy) or ``"exponential"``.
        normalized_gradient: normalized gradient descent, the same rule for both networks: each
            network's gradient is divided by its own global norm before the optimizer step, so
            with plain SGD every step has length ``lr`` (in the stored parameters ``s``/``γ``,
            ``v``). Gradient descent at a constant learning rate all but stops once the loss is
            small (its gradient shrinks with the loss); the normalized step keeps the late phase
            moving, where the asymptotic relative sparsity of EWN shows (Morwani & Ramaswamy).
            The objective is then ``log 𝓛̄`` (same gradient direction as 𝓛̄, finite at any margin).
        init_scale: multiplies PyTorch's default initial weights.
    """

    def __init__(self, num_classes: int = 2, in_channels: int = 1, image_size: int = 25,
                 widths: Sequence[int] = (64,), init_seed: int = 0, init_scale: float = 1.0,
                 loss: str = "logistic", normalized_gradient: bool = False,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, scheduler_interval: str = "epoch",
                 norm_weight_decay: float | None = None, bias_weight_decay: float | None = None) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval, norm_weight_decay, bias_weight_decay)
        if loss not in LOSSES:
            raise ValueError(f"model.loss must be one of {LOSSES}, got {loss!r}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.loss_name, self.normalized_gradient = loss, bool(normalized_gradient)
        outputs = 1 if num_classes == 2 else num_classes
        base = homogeneous_mlp(in_channels * image_size * image_size, list(widths), outputs, "none", False, init_seed,
                               init_scale)
        self.nets = nn.ModuleDict({"ewn": apply_weight_norm(copy.deepcopy(base), "ewn"),
                                   "swn": apply_weight_norm(copy.deepcopy(base), "swn")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nets["ewn"](x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        total = 0.0
        for name, net in self.nets.items():
            log_loss = log_mean_loss(net(x), y, self.loss_name)
            if not torch.isfinite(log_loss):  # an example module: one host sync per step is fine
                raise FloatingPointError(
                    f"WeightNormComparison: the {name.upper()} network's loss is {float(log_loss)} at step "
                    f"{self.global_step} (the step diverged, or the logits overflowed): lower optimizer.lr or the number of steps")
            self.log(f"train/log_loss_{name}", log_loss)
            self.log(f"train/loss_{name}", torch.exp(log_loss.detach().double()), prog_bar=True)
            total = total + (log_loss if self.normalized_gradient else torch.exp(log_loss))
        return total

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.normalized_gradient:
            return
        for name, net in self.nets.items():
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            if grads:  # the norm in float64: late in training ‖∇‖² overflows float32
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g.double() for g in grads])))
                if not torch.isfinite(norm):
                    raise FloatingPointError(f"WeightNormComparison: the {name.upper()} network's gradient norm is "
                                             f"{float(norm)} at step {self.global_step} (its logits overflowed): "
                                             "lower optimizer.lr or the number of steps")
                torch._foreach_div_(grads, float(norm.clamp_min(1e-300)))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        for name, net in self.nets.items():
            self.log(f"val/acc_{name}", _accuracy(net(x), y))
