"""Spherical Motion Dynamics theory: pure functions of the optimizer's hyper-parameters.

Everything here takes numbers and returns numbers (``float`` / ``int`` / ``None``); nothing
depends on ``torch.nn`` or Lightning. Symbols follow ``SMD_THEORY.md``: learning rate ``lr`` (η),
weight decay ``weight_decay`` (λ), heavy-ball momentum ``momentum`` (α), Adam/Lion betas.

* :func:`angular_update_sgd`, :func:`angular_update_sgdm`, :func:`angular_update_adamw`,
  :func:`angular_update_lion`: the equilibrium angular update Δ* per step, in radians.
* :func:`equilibrium_norm_sq_sgd`, :func:`equilibrium_norm_sq_sgdm`: the equilibrium squared
  weight norm ‖w*‖² from the unit-gradient statistic ``L``.
* :func:`relaxation_steps`, :func:`steps_to_equilibrium`: how fast the norm approaches equilibrium
  and how many steps an LR change costs (Corollary 3.1).
* :func:`equilibrium_ratio`: the factor k by which an (η, λ) change moves the equilibrium
  (‖w*‖⁴ divided by k); :func:`settling_steps`: steps to settle from an unknown start (the first
  stage of a fit).
* :func:`rescale_factor`: the factor that puts a tensor at its new equilibrium at once.
* :func:`equilibrium_norm_from_update`: the equilibrium norm ‖w*‖ of AdamW/Lion from the
  measured scale-free update length (the counterpart of ‖w*‖² from L for SGD).
* :func:`angular_update_nesterov`, :func:`angular_update_muon`, :func:`muon_gain`,
  :func:`muon_lr_ratio`, :func:`equilibrium_norm_muon`, :func:`momentum_correlation`: the Nesterov
  and Muon equilibria (``docs/optimizer_theory.md``).
* :func:`relaxation_steps_decoupled`, :func:`steps_to_equilibrium_decoupled`: the same for decoupled
  weight decay (AdamW, Lion, Muon: ‖w‖² relaxes at rate 2ηλ).
* :func:`norm_exponent`, :func:`drop_rescale_factor`: the drop factor ((η'λ)/(ηλ'))^e of each family
  (e = 1/4 for SGD/SGDM/Nesterov, 1/2 for AdamW/Lion/Muon).
* :func:`effective_weight_decay`, :func:`effective_hparams`: λ_eff of decays tied to η (lion-pytorch's
  ``decoupled_weight_decay``, timm's ``corrected_weight_decay``), which drop factors compare.
* :func:`from_param_group`: recognise the optimizer family of one param group and return a
  :class:`GroupTheory` that evaluates all of the above for it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = [
    "GroupTheory",
    "angular_update_adamw",
    "angular_update_lion",
    "angular_update_sgd",
    "angular_update_sgdm",
    "angular_update_nesterov",
    "angular_update_muon",
    "drop_rescale_factor",
    "effective_hparams",
    "effective_weight_decay",
    "equilibrium_norm_muon",
    "momentum_correlation",
    "muon_gain",
    "muon_lr_ratio",
    "norm_exponent",
    "relaxation_steps_decoupled",
    "steps_to_equilibrium_decoupled",
    "equilibrium_norm_sq_sgd",
    "equilibrium_norm_sq_sgdm",
    "equilibrium_norm_from_update",
    "equilibrium_ratio",
    "from_param_group",
    "relaxation_steps",
    "rescale_factor",
    "settling_steps",
    "steps_to_equilibrium",
]


def _check_positive(**values: float) -> None:
    for key, value in values.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{key} must be a positive finite number, got {value!r}")


def _check_fraction(**values: float) -> None:
    for key, value in values.items():
        if not 0 <= value < 1:
            raise ValueError(f"{key} must be in [0, 1), got {value!r}")


def angular_update_sgd(lr: float, weight_decay: float) -> float:
    """Δ* = sqrt(2λη) for plain SGD with coupled L2 weight decay (Theorem 1)."""
    _check_positive(lr=lr, weight_decay=weight_decay)
    return math.sqrt(2.0 * lr * weight_decay)


def angular_update_sgdm(lr: float, weight_decay: float, momentum: float) -> float:
    """Δ* = sqrt(2λη / (1 + α)) for heavy-ball SGD with coupled L2 weight decay (Theorem 2)."""
    _check_positive(lr=lr, weight_decay=weight_decay)
    _check_fraction(momentum=momentum)
    return math.sqrt(2.0 * lr * weight_decay / (1.0 + momentum))


def angular_update_adamw(lr: float, weight_decay: float, beta1: float) -> float:
    """Δ* = sqrt(2ηλ (1 − β1) / (1 + β1)) for AdamW with decoupled weight decay (Kosson et al.)."""
    _check_positive(lr=lr, weight_decay=weight_decay)
    _check_fraction(beta1=beta1)
    return math.sqrt(2.0 * lr * weight_decay * (1.0 - beta1) / (1.0 + beta1))


def angular_update_lion(lr: float, weight_decay: float, beta1: float, beta2: float) -> float:
    """Δ* = sqrt(π/2)·sqrt(2ηλ)·sqrt((1 − β1)² + β1²(1 − β2)/(1 + β2)) for Lion (Kosson et al.)."""
    _check_positive(lr=lr, weight_decay=weight_decay)
    _check_fraction(beta1=beta1, beta2=beta2)
    mix = (1.0 - beta1) ** 2 + beta1**2 * (1.0 - beta2) / (1.0 + beta2)
    return math.sqrt(math.pi / 2.0) * math.sqrt(2.0 * lr * weight_decay) * math.sqrt(mix)


def momentum_correlation(momentum: float, nesterov: bool = False) -> float:
    """ρ = Σa_j² / (Σa_j)²: how much of a momentum filter's per-step update survives in the random walk.

    A gradient g_t enters the updates of steps t, t+1, … with weights a_0, a_1, …; with gradients
    uncorrelated across steps the norm grows as (Σa)²·‖g‖² per step while one step moves by
    sqrt(Σa²)·‖g‖ (``docs/optimizer_theory.md`` §1). Heavy ball (torch SGD or an EMA buffer):
    a_j ∝ α^j, ρ = (1 − α)/(1 + α). Nesterov (torch SGD ``g + α·buf``, Muon ``g.lerp(buf, α)``):
    a_0 ∝ 1 + α, a_j ∝ α^(j+1), ρ = (1 − α)(1 + 2α − 2α³)/(1 + α).
    """
    _check_fraction(momentum=momentum)
    a = momentum
    if nesterov:
        return (1.0 - a) * (1.0 + 2.0 * a - 2.0 * a**3) / (1.0 + a)
    return (1.0 - a) / (1.0 + a)


def angular_update_nesterov(lr: float, weight_decay: float, momentum: float) -> float:
    """Δ* = sqrt(2λη·(1 + 2α − 2α³)/(1 + α)) for SGD with ``nesterov=True`` and coupled L2 decay.

    Derived like Theorem 2 (``docs/optimizer_theory.md`` §2): the decay and the total contribution
    of each gradient are those of heavy ball (Σa = 1/(1 − α)), the per-step update is larger:
    Δ*² = 2λη·ρ/(1 − α) with ρ = :func:`momentum_correlation` (α, nesterov=True). α = 0 gives SGD's
    sqrt(2λη); α = 0.9 gives 1.16 × heavy ball's sqrt(2λη/(1 + α)).
    """
    _check_positive(lr=lr, weight_decay=weight_decay)
    _check_fraction(momentum=momentum)
    a = momentum
    return math.sqrt(2.0 * lr * weight_decay * (1.0 + 2.0 * a - 2.0 * a**3) / (1.0 + a))


#: torch.optim.Muon's Newton–Schulz defaults (Keller Jordan's quintic)
MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MUON_NS_STEPS = 5


@functools.lru_cache(maxsize=256)
def muon_gain(rows: int, cols: int, ns_coefficients: tuple[float, float, float] = MUON_NS_COEFFICIENTS,
              ns_steps: int = MUON_NS_STEPS, points: int = 2048) -> tuple[float, float]:
    """``(κ, m2)`` of Muon's orthogonalization O = NS(X) for a ``rows × cols`` Gaussian input X.

    κ = E⟨O, X⟩² / (E‖X‖²·E‖O‖²) is the Bussgang gain: the fraction of ‖O‖² that is a linear
    function of X (the rest does not add up across steps). m2 = E‖O‖²/min(rows, cols): the mean
    squared singular value of O (1 for an exact polar factor; the 5-step quintic leaves them in
    ≈ [0.7, 1.2]). Computed by quadrature over the Marchenko–Pastur law of X's singular values (of
    X/‖X‖_F: sqrt(x/m), x ~ MP(q = min/max), mean 1), each pushed through the Newton–Schulz
    polynomial s ↦ a·s + b·s³ + c·s⁵ ``ns_steps`` times. Square matrices: κ ≈ 0.72 (exact polar:
    (8/3π)² = 0.72); κ → 1 as the aspect ratio grows (rows of a wide Gaussian matrix are nearly
    orthogonal already).
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"Muon needs a matrix shape, got {rows} × {cols}")
    m, n = min(rows, cols), max(rows, cols)
    q = m / n
    lo, hi = (1.0 - math.sqrt(q)) ** 2, (1.0 + math.sqrt(q)) ** 2
    a, b, c = ns_coefficients
    total = e_os = e_oo = 0.0
    for i in range(points):  # midpoint rule in θ: x = lo + (hi − lo)(1 − cos θ)/2 smooths both edges
        theta = math.pi * (i + 0.5) / points
        x = lo + (hi - lo) * (1.0 - math.cos(theta)) / 2.0
        weight = ((hi - lo) / 2.0) ** 2 * math.sin(theta) ** 2 / (2.0 * math.pi * q * x)
        s = math.sqrt(x / m)
        o = s
        for _ in range(ns_steps):
            o2 = o * o
            o = o * (a + b * o2 + c * o2 * o2)
        total += weight
        e_os += weight * o * math.sqrt(x)
        e_oo += weight * o * o
    e_os, e_oo = e_os / total, e_oo / total
    return e_os * e_os / e_oo, e_oo


def muon_lr_ratio(shape: tuple[int, ...], adjust_lr_fn: str | None = None) -> float:
    """The factor torch.optim.Muon multiplies lr by for the update of a ``shape`` = (A, B) matrix.

    ``"original"`` / ``None``: sqrt(max(1, A/B)); ``"match_rms_adamw"``: 0.2·sqrt(max(A, B));
    ``"spectral_unclamped"``: sqrt(A/B) (torch/optim/_muon.py ``_adjust_lr``). The decay uses lr itself.
    """
    rows, cols = int(shape[0]), int(shape[1])
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return math.sqrt(rows / cols)
    raise ValueError(f"Muon adjust_lr_fn must be None, 'original', 'match_rms_adamw' or 'spectral_unclamped', "
                     f"got {adjust_lr_fn!r}")


def muon_correlation(momentum: float, nesterov: bool, shape: tuple[int, ...]) -> float:
    """ρ of a Muon update: 1/(κ/ρ_lin + 1 − κ), ρ_lin = :func:`momentum_correlation`, κ = :func:`muon_gain`.

    The linear part κ of O adds up across steps like a linear momentum's (ρ_lin); the residual
    1 − κ is treated as uncorrelated from step to step. Exact at α = 0 (ρ = 1), Kosson et al.'s
    linearisation (ρ_lin/κ) for α → 1.
    """
    kappa, _ = muon_gain(int(shape[0]), int(shape[1]))
    linear = momentum_correlation(momentum, nesterov)
    return 1.0 / (kappa / linear + 1.0 - kappa)


def angular_update_muon(lr: float, weight_decay: float, momentum: float, nesterov: bool = True,
                        shape: tuple[int, ...] = (1024, 1024)) -> float:
    """Δ* = sqrt(2ηλ·ρ) for a scale-invariant ``shape`` matrix under torch.optim.Muon.

    ρ = :func:`muon_correlation` (momentum, nesterov, shape). Independent of ``adjust_lr_fn`` (it
    scales the update, hence ‖w*‖, not the angle). ``docs/optimizer_theory.md`` §3.
    """
    _check_positive(lr=lr, weight_decay=weight_decay)
    _check_fraction(momentum=momentum)
    return math.sqrt(2.0 * lr * weight_decay * muon_correlation(momentum, nesterov, shape))


def equilibrium_norm_muon(lr: float, weight_decay: float, momentum: float, nesterov: bool = True,
                          shape: tuple[int, ...] = (1024, 1024), adjust_lr_fn: str | None = None) -> float:
    """‖w*‖ = r·η·‖O‖/Δ* with r = :func:`muon_lr_ratio`, ‖O‖² = min(A, B)·m2 (:func:`muon_gain`).

    The prediction for Gaussian-like momentum; real gradients (fewer large singular values) give a
    smaller ‖O‖: the callback uses the measured update length instead (:func:`equilibrium_norm_from_update`).
    """
    star = angular_update_muon(lr, weight_decay, momentum, nesterov, shape)
    _, m2 = muon_gain(int(shape[0]), int(shape[1]))
    return muon_lr_ratio(shape, adjust_lr_fn) * lr * math.sqrt(min(int(shape[0]), int(shape[1])) * m2) / star


def relaxation_steps_decoupled(lr: float, weight_decay: float) -> float:
    """1/(2ηλ): time constant, in steps, of ‖w‖² under decoupled decay (AdamW, Lion, Muon).

    ‖w_{t+1}‖² ≈ (1 − 2ηλ)‖w_t‖² + η²·D with D independent of ‖w‖ (the update is scale-free), so
    ‖w‖² − ‖w*‖² shrinks by e^(−2ηλ) per step, momentum or not (the decay bypasses the buffer).
    """
    _check_positive(lr=lr, weight_decay=weight_decay)
    return 1.0 / (2.0 * lr * weight_decay)


def steps_to_equilibrium_decoupled(lr_old: float, lr_new: float, weight_decay_old: float,
                                   weight_decay_new: float | None = None) -> int:
    """``⌈|log k|/(2η'λ')⌉`` steps after (η, λ) → (η', λ') under decoupled decay, k = (ηλ')/(η'λ)."""
    weight_decay_new = weight_decay_old if weight_decay_new is None else weight_decay_new
    k = equilibrium_ratio(lr_old, lr_new, weight_decay_old, weight_decay_new)
    if math.isclose(k, 1.0, rel_tol=1e-12):
        return 0
    return math.ceil(abs(math.log(k)) / (2.0 * weight_decay_new * lr_new))


#: families whose update scales with the gradient (‖w*‖ ∝ (η/λ)^(1/4)) / is scale-free (‖w*‖ ∝ (η/λ)^(1/2))
COUPLED_FAMILIES = ("sgd", "sgdm", "nesterov")
DECOUPLED_FAMILIES = ("adamw", "lion", "muon")


def norm_exponent(family: str) -> float | None:
    """e in ‖w*‖ ∝ (η/λ)^e: 1/4 for SGD/SGDM/Nesterov, 1/2 for AdamW/Lion/Muon, ``None`` otherwise."""
    if family in COUPLED_FAMILIES:
        return 0.25
    if family in DECOUPLED_FAMILIES:
        return 0.5
    return None


def drop_rescale_factor(lr_old: float, lr_new: float, weight_decay_old: float,
                        weight_decay_new: float | None = None, exponent: float = 0.25) -> float:
    """``((η'·λ)/(η·λ'))^e``: the factor that moves an equilibrium ‖w*‖ ∝ (η/λ)^e to the new one.

    e = :func:`norm_exponent` of the family: k^(-1/4) for SGD/SGDM/Nesterov at an LR ÷k,
    k^(-1/2) for AdamW/Lion/Muon. Applied at equilibrium it keeps Δ_t/Δ*.
    """
    weight_decay_new = weight_decay_old if weight_decay_new is None else weight_decay_new
    _check_positive(lr_old=lr_old, lr_new=lr_new, weight_decay_old=weight_decay_old, weight_decay_new=weight_decay_new)
    return ((lr_new * weight_decay_old) / (lr_old * weight_decay_new)) ** exponent


def equilibrium_norm_sq_sgd(unit_grad_sq: float, lr: float, weight_decay: float) -> float:
    """‖w*‖² = sqrt(L·η / (2λ)) for SGD, with ``unit_grad_sq`` = L = E‖g̃‖²."""
    _check_positive(lr=lr, weight_decay=weight_decay)
    if unit_grad_sq < 0:
        raise ValueError(f"unit_grad_sq (L) must be >= 0, got {unit_grad_sq!r}")
    return math.sqrt(unit_grad_sq * lr / (2.0 * weight_decay))


def equilibrium_norm_sq_sgdm(unit_grad_sq: float, lr: float, weight_decay: float, momentum: float) -> float:
    """‖w*‖² = sqrt(L·η / (λ(1 − α)(2 − λη/(1 + α)))) for heavy-ball SGD, L = E h̃."""
    _check_positive(lr=lr, weight_decay=weight_decay)
    _check_fraction(momentum=momentum)
    if unit_grad_sq < 0:
        raise ValueError(f"unit_grad_sq (L) must be >= 0, got {unit_grad_sq!r}")
    denom = weight_decay * (1.0 - momentum) * (2.0 - weight_decay * lr / (1.0 + momentum))
    return math.sqrt(unit_grad_sq * lr / denom)


def equilibrium_norm_from_update(update_rms: float, lr: float, angular_update: float) -> float:
    """‖w*‖ = η·ū / Δ* for optimizers whose update does not scale with ‖w‖ (AdamW, Lion).

    Derivation (SMD_THEORY §3, Kosson et al.): AdamW's step is ``w ← (1 − ηλ)w − η·u`` with
    ``u = m̂/(√v̂ + ε)``; Lion's ``u = sign(·)``. Both are invariant to the scale of the gradient,
    so for a scale-invariant tensor (∇L(c·w) = ∇L(w)/c) ``u`` depends on the direction of ``w``
    only, not on ‖w‖, η or λ. The decay is radial, so the angle one step turns is
    ``Δ_t ≈ η‖u_⊥‖/‖w_t‖``; hence ``ū² = E[(Δ_t·‖w_t‖/η_t)²]`` (the RMS of the tangential update,
    measured from Δ_t and ‖w_t‖ at any norm, in or out of equilibrium) is a property of the
    direction, like L for SGD. Kosson et al. give the equilibrium angle Δ* of the random-walk
    balance (:func:`angular_update_adamw`, :func:`angular_update_lion`); the norm at which a
    step turns by Δ* is therefore ``‖w*‖ = η·ū/Δ*``. Since Δ* ∝ sqrt(ηλ), ‖w*‖ ∝ sqrt(η/λ):
    an LR ÷k at equilibrium moves ‖w*‖ by k^(-1/2) (not SGD's k^(-1/4)).
    """
    _check_positive(lr=lr, angular_update=angular_update)
    if not update_rms >= 0:
        raise ValueError(f"update_rms must be >= 0, got {update_rms!r}")
    return lr * update_rms / angular_update


def relaxation_steps(lr: float, weight_decay: float, momentum: float = 0.0) -> float:
    """Time constant of the approach to equilibrium, in steps: (1 − α) / (4λη)."""
    _check_positive(lr=lr, weight_decay=weight_decay)
    _check_fraction(momentum=momentum)
    return (1.0 - momentum) / (4.0 * weight_decay * lr)


def steps_to_equilibrium(
    lr_old: float,
    lr_new: float,
    weight_decay_old: float,
    weight_decay_new: float | None = None,
    momentum: float = 0.0,
) -> int:
    """Steps needed to reach the new equilibrium after (η, λ) → (η', λ') without a rescale.

    Corollary 3.1: dividing η by k costs ``⌈log(k)·(1 − α) / (4λη')⌉`` steps (η' the new rate).
    A general change moves ‖w*‖² by the factor sqrt((η'λ)/(ηλ')), i.e. k = (ηλ')/(η'λ).
    Returns 0 when nothing changes.
    """
    weight_decay_new = weight_decay_old if weight_decay_new is None else weight_decay_new
    _check_positive(lr_old=lr_old, lr_new=lr_new, weight_decay_old=weight_decay_old, weight_decay_new=weight_decay_new)
    _check_fraction(momentum=momentum)
    k = (lr_old * weight_decay_new) / (lr_new * weight_decay_old)
    if math.isclose(k, 1.0, rel_tol=1e-12):
        return 0
    return math.ceil(abs(math.log(k)) * (1.0 - momentum) / (4.0 * weight_decay_new * lr_new))


def equilibrium_ratio(
    lr_old: float, lr_new: float, weight_decay_old: float, weight_decay_new: float | None = None
) -> float:
    """k = (η·λ')/(η'·λ): an (η, λ) → (η', λ') change divides the equilibrium ‖w*‖⁴ (∝ η/λ) by k.

    k > 1 is a drop (η ÷ k at fixed λ), k < 1 a rise. It is the k of Corollary 3.1
    (:func:`steps_to_equilibrium` costs ``⌈|log k|·(1 − α)/(4λ'η')⌉`` steps) and of the rescale
    (:func:`rescale_factor` is ``k^(-1/4)``).
    """
    weight_decay_new = weight_decay_old if weight_decay_new is None else weight_decay_new
    _check_positive(lr_old=lr_old, lr_new=lr_new, weight_decay_old=weight_decay_old, weight_decay_new=weight_decay_new)
    return (lr_old * weight_decay_new) / (lr_new * weight_decay_old)


def settling_steps(lr: float, weight_decay: float, momentum: float = 0.0, time_constants: float = 3.0) -> int:
    """``⌈n·(1 − α)/(4λη)⌉``: steps for the norm to settle from a start of unknown distance.

    From the initialisation the distance to ‖w*‖ is not known before L has been measured, so
    Corollary 3.1 has no k. The approach is exponential with the time constant
    :func:`relaxation_steps`; ``time_constants`` = n of them shrink the initial deviation by
    e^(−n) (n = 3: 95 % of the way). This is Corollary 3.1's count for k = e^n (≈ 20 for n = 3).
    """
    if not (time_constants > 0 and math.isfinite(time_constants)):
        raise ValueError(f"time_constants must be a positive finite number, got {time_constants!r}")
    steps = time_constants * relaxation_steps(lr, weight_decay, momentum)
    return math.ceil(steps * (1.0 - 1e-12))  # 7500.000000000001 from rounding is 7500 steps


def rescale_factor(lr_old: float, lr_new: float, weight_decay_old: float, weight_decay_new: float | None = None) -> float:
    """Factor ``((η'·λ)/(η·λ'))^(1/4)`` that multiplies a scale-invariant tensor at an (η, λ) change.

    For an LR divided by k (same λ) this is ``k^(-1/4)``: the squared norm is divided by √k, the
    new equilibrium holds at once (Section 5.2).
    """
    weight_decay_new = weight_decay_old if weight_decay_new is None else weight_decay_new
    _check_positive(lr_old=lr_old, lr_new=lr_new, weight_decay_old=weight_decay_old, weight_decay_new=weight_decay_new)
    return ((lr_new * weight_decay_old) / (lr_old * weight_decay_new)) ** 0.25


@dataclass(frozen=True)
class GroupTheory:
    """The SMD predictions for one optimizer param group at its current hyper-parameters.

    ``family`` is one of ``"sgd"``, ``"sgdm"``, ``"nesterov"``, ``"adamw"``, ``"lion"``, ``"muon"``
    or ``"none"``. For ``"none"``, ``angular_update`` is ``None`` and ``reason`` says why no formula
    applies. ``effective_lr`` folds SGD dampening into the rate: torch's dampening multiplies the
    whole update (gradient and coupled decay) by ``1 − dampening``. Muon: ``shape`` is the group's
    largest matrix (its Δ* is the group's line; :meth:`angular_update_for` gives each tensor's own),
    ``nesterov`` and ``adjust_lr_fn`` its settings.
    """

    family: str
    lr: float
    weight_decay: float
    momentum: float = 0.0
    beta1: float = 0.0
    beta2: float = 0.0
    dampening: float = 0.0
    reason: str | None = None
    nesterov: bool = False
    shape: tuple[int, int] | None = None
    adjust_lr_fn: str | None = None

    @property
    def effective_lr(self) -> float:
        return self.lr * (1.0 - self.dampening)

    @property
    def has_formula(self) -> bool:
        return self.family != "none"

    @property
    def decoupled(self) -> bool:
        """Decoupled decay with a scale-free update (AdamW, Lion, Muon): ‖w*‖ ∝ (η/λ)^(1/2)."""
        return self.family in DECOUPLED_FAMILIES

    @property
    def angular_update(self) -> float | None:
        """Δ* in radians per step, or ``None`` where no formula applies."""
        if self.family == "sgd":
            return angular_update_sgd(self.effective_lr, self.weight_decay)
        if self.family == "sgdm":
            return angular_update_sgdm(self.effective_lr, self.weight_decay, self.momentum)
        if self.family == "nesterov":
            return angular_update_nesterov(self.lr, self.weight_decay, self.momentum)
        if self.family == "adamw":
            return angular_update_adamw(self.lr, self.weight_decay, self.beta1)
        if self.family == "lion":
            return angular_update_lion(self.lr, self.weight_decay, self.beta1, self.beta2)
        if self.family == "muon":
            return angular_update_muon(self.lr, self.weight_decay, self.momentum, self.nesterov,
                                       self.shape or (1024, 1024))
        return None

    def angular_update_for(self, shape: Any) -> float | None:
        """Δ* of one tensor of this group: Muon's depends on the matrix shape, the others' do not."""
        if self.family == "muon" and shape is not None and len(shape) == 2:
            return angular_update_muon(self.lr, self.weight_decay, self.momentum, self.nesterov,
                                       (int(shape[0]), int(shape[1])))
        return self.angular_update

    def equilibrium_norm_sq(self, unit_grad_sq: float) -> float | None:
        """‖w*‖² from the running estimate of L; ``None`` where the theory gives no formula."""
        if self.family == "sgd":
            return equilibrium_norm_sq_sgd(unit_grad_sq, self.effective_lr, self.weight_decay)
        if self.family in ("sgdm", "nesterov"):  # Nesterov: same decay and total gradient weight 1/(1 − α)
            return equilibrium_norm_sq_sgdm(unit_grad_sq, self.effective_lr, self.weight_decay, self.momentum)
        return None

    def equilibrium_norm(self, unit_grad_sq: float | None, update_rms: float | None,
                         shape: Any = None) -> float | None:
        """‖w*‖ at this group's hyper-parameters: from L (SGD/SGDM/Nesterov) or from the scale-free
        update length ū (AdamW/Lion/Muon, :func:`equilibrium_norm_from_update`; ``shape``: the
        tensor's, for Muon's Δ*); ``None`` when the needed estimate is missing (not yet measured, or
        L ≤ 0) or no formula applies."""
        if self.family in COUPLED_FAMILIES:
            if unit_grad_sq is None or not (unit_grad_sq > 0 and math.isfinite(unit_grad_sq)):
                return None
            return math.sqrt(self.equilibrium_norm_sq(unit_grad_sq))
        if self.decoupled:
            if update_rms is None or not (update_rms > 0 and math.isfinite(update_rms)):
                return None
            return equilibrium_norm_from_update(update_rms, self.lr, self.angular_update_for(shape))
        return None

    @property
    def norm_exponent(self) -> float | None:
        """e in ‖w*‖ ∝ (η/λ)^e: 1/4 for SGD/SGDM/Nesterov (‖w*‖² = sqrt(Lη/2λ)), 1/2 for AdamW/Lion/Muon."""
        return norm_exponent(self.family)

    def drop_factor(self, lr_old: float, weight_decay_old: float) -> float | None:
        """The ``rescale=True`` factor from (``lr_old``, ``weight_decay_old``) to this group's (η, λ)."""
        exponent = self.norm_exponent
        if exponent is None:
            return None
        return drop_rescale_factor(lr_old, self.lr, weight_decay_old, self.weight_decay, exponent)

    @property
    def relaxation_steps(self) -> float | None:
        """Time constant of the approach to equilibrium, in steps: (1 − α)/(4λη) (SGD/SGDM/Nesterov),
        1/(2ηλ) (AdamW/Lion/Muon)."""
        if self.family in COUPLED_FAMILIES:
            return relaxation_steps(self.effective_lr, self.weight_decay, self.momentum)
        if self.decoupled:
            return relaxation_steps_decoupled(self.lr, self.weight_decay)
        return None

    def settling_steps(self, time_constants: float = 3.0) -> int | None:
        """Steps to settle from the initialisation: ``time_constants`` relaxation times (rounded up)."""
        tau = self.relaxation_steps
        if tau is None:
            return None
        if self.family in COUPLED_FAMILIES:
            return settling_steps(self.effective_lr, self.weight_decay, self.momentum, time_constants)
        return math.ceil(time_constants * tau * (1.0 - 1e-12))

    def steps_to_equilibrium_from(self, previous: GroupTheory) -> int | None:
        """Corollary 3.1 steps to reach this group's equilibrium from ``previous``'s: ⌈|log k|(1 − α)/(4λ'η')⌉
        (SGD/SGDM/Nesterov), ⌈|log k|/(2λ'η')⌉ (AdamW/Lion/Muon)."""
        if not previous.has_formula:
            return None
        if self.family in COUPLED_FAMILIES:
            return steps_to_equilibrium(
                previous.effective_lr, self.effective_lr, previous.weight_decay, self.weight_decay, self.momentum
            )
        if self.decoupled:
            return steps_to_equilibrium_decoupled(previous.lr, self.lr, previous.weight_decay, self.weight_decay)
        return None


def _as_float(value: Any, key: str) -> float:
    # A tensor-valued lr (capturable/fused optimizers) is read on the host; callers only do this
    # on measured steps.
    if hasattr(value, "item"):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"param group key {key!r} must be a number, got {value!r}") from None


def _largest_matrix(params: Any) -> tuple[int, int] | None:
    shapes = [tuple(int(d) for d in p.shape) for p in params if getattr(p, "ndim", 0) == 2]
    return max(shapes, key=lambda sh: (sh[0] * sh[1], sh)) if shapes else None


def _class_names(optimizer: Any) -> list[str]:
    return [cls.__name__.lower() for cls in type(optimizer).__mro__]


def effective_weight_decay(optimizer: Any, group: Mapping[str, Any], lr: float, weight_decay: float) -> float:
    """λ_eff of a group whose decay step is ``p·(1 − η·λ_eff)``, for (``lr``, ``weight_decay``) = (η, λ).

    λ for torch's optimizers and plain Lion; λ/η_0 for lion-pytorch's ``decoupled_weight_decay=True``
    (η_0 its initial lr, a constant); λ·η/η_max for timm's ``corrected_weight_decay=True`` (Lion,
    AdamW: the decay is λ·η²/η_max, η_max the group's ``max_lr_snapshot``). The equilibrium of the
    decoupled families follows (η, λ_eff): with timm's correction ‖w*‖ ∝ sqrt(η/λ_eff) =
    sqrt(η_max/λ) does not move at an LR change, and the drop factor is 1.
    """
    if getattr(optimizer, "decoupled_wd", False) and _as_float(getattr(optimizer, "_init_lr", 0.0), "lr") > 0:
        weight_decay /= _as_float(optimizer._init_lr, "lr")
    if group.get("corrected_weight_decay", False) and _as_float(group.get("max_lr_snapshot", 0.0), "lr") > 0:
        weight_decay *= lr / _as_float(group["max_lr_snapshot"], "lr")
    return weight_decay


def effective_hparams(optimizer: Any, group: Mapping[str, Any], hparams: tuple[float, float]) -> tuple[float, float]:
    """(η, λ_eff) for a group's raw (η, λ) (:func:`effective_weight_decay`): what a drop factor compares."""
    lr, weight_decay = hparams
    if not (lr > 0 and math.isfinite(lr)):
        return lr, weight_decay
    return lr, effective_weight_decay(optimizer, group, lr, weight_decay)


def from_param_group(optimizer: Any, group: Mapping[str, Any]) -> GroupTheory:
    """Recognise the optimizer family of ``group`` (a ``param_groups`` entry) and its formula.

    Recognised: ``torch.optim.SGD`` and look-alikes (class name contains ``sgd``, or the group has
    ``momentum``, ``dampening`` and ``nesterov`` keys),
    ``torch.optim.AdamW``, ``torch.optim.Adam(decoupled_weight_decay=True)``, timm's AdamW, and
    Lion-style optimizers (class name contains ``lion`` and ``betas`` in the group), SGD with
    ``nesterov=True`` (family ``"nesterov"``) and ``torch.optim.Muon`` and look-alikes (class name
    contains ``muon``; family ``"muon"``). Everything else, Adam with coupled L2,
    ``weight_decay == 0`` and ``maximize`` return
    ``family="none"`` with a ``reason`` (measurements still work; only the theory is missing).
    Reads the *current* values, so call it again after a scheduler changed them.
    """
    names = _class_names(optimizer)
    opt_name = type(optimizer).__name__
    lr = _as_float(group.get("lr", float("nan")), "lr")
    weight_decay = _as_float(group.get("weight_decay", 0.0), "weight_decay")

    def none(reason: str, **kw: float) -> GroupTheory:
        return GroupTheory("none", lr, weight_decay, reason=reason, **kw)

    if not (lr > 0 and math.isfinite(lr)):
        return none(f"{opt_name}: lr={lr!r} is not a positive number")
    if group.get("maximize", False):
        return none(f"{opt_name}: maximize=True is not covered by the theory")

    betas = group.get("betas")
    is_lion = any("lion" in n for n in names)
    # Muon-with-auxiliary-AdamW optimizers (Keller Jordan's MuonWithAuxAdam pattern) flag their AdamW groups
    is_adam = (any(n.startswith("adam") or n == "nadamw" for n in names) or group.get("use_muon") is False) \
        and betas is not None

    if any("muon" in n for n in names) and betas is None:
        momentum = _as_float(group.get("momentum", 0.0), "momentum")
        nesterov = bool(group.get("nesterov", False))
        adjust = group.get("adjust_lr_fn")
        shape = _largest_matrix(group.get("params", ()))
        if not 0 <= momentum < 1:
            return none(f"{opt_name}: momentum={momentum} outside [0, 1)", momentum=momentum)
        if weight_decay <= 0:
            return none(f"{opt_name}: weight_decay=0, scale-invariant weights have no equilibrium (‖w‖ grows)",
                        momentum=momentum)
        return GroupTheory("muon", lr, weight_decay, momentum=momentum, nesterov=nesterov, shape=shape,
                           adjust_lr_fn=adjust if isinstance(adjust, str) else None)

    if is_lion and betas is not None:
        beta1, beta2 = (_as_float(b, "betas") for b in betas)
        weight_decay = effective_weight_decay(optimizer, group, lr, weight_decay)
        if weight_decay <= 0:
            return none(f"{opt_name}: weight_decay=0, scale-invariant weights have no equilibrium (‖w‖ grows)",
                        beta1=beta1, beta2=beta2)
        return GroupTheory("lion", lr, weight_decay, beta1=beta1, beta2=beta2)

    if is_adam:
        beta1, beta2 = (_as_float(b, "betas") for b in betas)
        decoupled = "adamw" in names[0] or bool(group.get("decoupled_weight_decay", False))
        weight_decay = effective_weight_decay(optimizer, group, lr, weight_decay)
        if not decoupled:
            return none(
                f"{opt_name}: Adam with coupled L2 weight decay has no equilibrium formula; "
                "use AdamW (decoupled) to get one",
                beta1=beta1,
                beta2=beta2,
            )
        if weight_decay <= 0:
            return none(f"{opt_name}: weight_decay=0, scale-invariant weights have no equilibrium (‖w‖ grows)",
                        beta1=beta1, beta2=beta2)
        return GroupTheory("adamw", lr, weight_decay, beta1=beta1, beta2=beta2)

    is_sgd = any("sgd" in n for n in names) or {"momentum", "dampening", "nesterov"} <= set(group)
    if is_sgd and betas is None:
        momentum = _as_float(group.get("momentum", 0.0), "momentum")
        dampening = _as_float(group.get("dampening", 0.0), "dampening")
        if not 0 <= momentum < 1:
            return none(f"{opt_name}: momentum={momentum} outside [0, 1)", momentum=momentum)
        if not 0 <= dampening < 1:
            return none(f"{opt_name}: dampening={dampening} outside [0, 1)", momentum=momentum)
        if weight_decay <= 0:
            return none(f"{opt_name}: weight_decay=0, scale-invariant weights have no equilibrium (‖w‖ grows)",
                        momentum=momentum)
        nesterov = bool(group.get("nesterov", False)) and momentum > 0
        family = "nesterov" if nesterov else "sgdm" if momentum > 0 else "sgd"
        return GroupTheory(family, lr, weight_decay, momentum=momentum, dampening=dampening if momentum > 0 else 0.0,
                           nesterov=nesterov)

    return none(f"{opt_name}: no equilibrium formula for this optimizer")
