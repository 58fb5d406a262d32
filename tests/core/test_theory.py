"""Theory functions against hand-computed values and direct simulations of the SMD recursions."""

import math
import random

import pytest
import torch

from lightning_smd import theory


def test_angular_update_hand_values():
    assert theory.angular_update_sgd(0.2, 1e-4) == pytest.approx(math.sqrt(4e-5))  # 6.32e-3
    assert theory.angular_update_sgdm(0.2, 1e-4, 0.9) == pytest.approx(math.sqrt(4e-5 / 1.9))
    assert theory.angular_update_adamw(1e-3, 0.05, 0.9) == pytest.approx(math.sqrt(2 * 1e-3 * 0.05 * 0.1 / 1.9))
    lion = theory.angular_update_lion(1e-4, 1.0, 0.9, 0.99)
    assert lion == pytest.approx(math.sqrt(math.pi / 2) * math.sqrt(2e-4) * math.sqrt(0.01 + 0.81 * 0.01 / 1.99))


def test_equilibrium_norm_hand_values():
    assert theory.equilibrium_norm_sq_sgd(4.0, 0.1, 1e-3) == pytest.approx(math.sqrt(4.0 * 0.1 / 2e-3))
    expected = math.sqrt(4.0 * 0.1 / (1e-3 * 0.1 * (2 - 1e-4 / 1.9)))
    assert theory.equilibrium_norm_sq_sgdm(4.0, 0.1, 1e-3, 0.9) == pytest.approx(expected)


def test_steps_and_rescale_factor():
    # Corollary 3.1: LR ÷10 at η'=0.01, λ=1e-4, α=0.9 -> ceil(log(10)*0.1/(4e-6))
    assert theory.steps_to_equilibrium(0.1, 0.01, 1e-4, momentum=0.9) == math.ceil(math.log(10) * 0.1 / 4e-6)
    assert theory.steps_to_equilibrium(0.1, 0.01, 1e-4) == math.ceil(math.log(10) / 4e-6)
    assert theory.steps_to_equilibrium(0.1, 0.1, 1e-4) == 0
    assert theory.rescale_factor(0.1, 0.01, 1e-4) == pytest.approx(10 ** -0.25)
    # a wd change (η, λ) -> (η, 2λ): ((η λ) / (η 2λ))^(1/4)
    assert theory.rescale_factor(0.1, 0.1, 1e-4, 2e-4) == pytest.approx(0.5**0.25)
    assert theory.relaxation_steps(0.1, 1e-4, 0.9) == pytest.approx(0.1 / 4e-5)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_inputs_name_the_argument(bad):
    with pytest.raises(ValueError, match="lr"):
        theory.angular_update_sgd(bad, 1e-4)
    with pytest.raises(ValueError, match="momentum"):
        theory.angular_update_sgdm(0.1, 1e-4, 1.0)


def _simulate_norm_sq(lr, wd, momentum, unit_grad_sq, steps, x0, seed=0):
    """Direct simulation of SMD_THEORY §3 with random tangential unit gradients in R^p.

    w ∈ R^p, g_t ⊥ w_t with ‖g_t‖ = sqrt(L)/‖w_t‖ (scale-invariant gradient of unit norm sqrt(L)).
    """
    gen = torch.Generator().manual_seed(seed)
    p = 2000
    w = torch.randn(p, generator=gen, dtype=torch.float64)
    w *= math.sqrt(x0) / w.norm()
    v = torch.zeros_like(w)
    norms = []
    for _ in range(steps):
        g = torch.randn(p, generator=gen, dtype=torch.float64)
        g -= (g @ w) / (w @ w) * w
        g *= math.sqrt(unit_grad_sq) / (g.norm() * w.norm())
        v = momentum * v + g + wd * w
        w = w - lr * v
        norms.append(float(w @ w))
    return norms


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_sgd_recursion_reaches_theory():
    lr, wd, L = 0.1, 1e-3, 4.0
    norms = _simulate_norm_sq(lr, wd, 0.0, L, steps=30000, x0=1.0)
    expected = theory.equilibrium_norm_sq_sgd(L, lr, wd)
    assert sum(norms[-2000:]) / 2000 == pytest.approx(expected, rel=0.02)


def test_sgdm_recursion_reaches_theory():
    lr, wd, alpha, L = 0.1, 1e-3, 0.9, 4.0
    norms = _simulate_norm_sq(lr, wd, alpha, L, steps=8000, x0=1.0)
    # independent tangential g: ⟨v_{t-1}, g_t⟩ ≈ 0, so L = E h̃ = E‖g̃‖²
    expected = theory.equilibrium_norm_sq_sgdm(L, lr, wd, alpha)
    assert sum(norms[-2000:]) / 2000 == pytest.approx(expected, rel=0.03)


def test_synthetic_check_appendix_c1():
    """001 App. C.1: x_{t+1} = (1 − 2λη) x_t + L_t η² / x_t converges to sqrt(L η / (2λ))."""
    lr, wd, L = 0.1, 1e-3, 2.0
    rng = random.Random(0)
    x = 10.0
    tail = []
    for t in range(40000):
        L_t = L * (1 + 0.5 * (2 * rng.random() - 1))  # noisy, mean L
        x = (1 - 2 * wd * lr) * x + L_t * lr**2 / x
        if t >= 30000:
            tail.append(x)
    assert sum(tail) / len(tail) == pytest.approx(theory.equilibrium_norm_sq_sgd(L, lr, wd), rel=0.01)


def test_relaxation_time_matches_recursion():
    """The distance to equilibrium shrinks like (1 − 4λη/(1 − α))^t."""
    lr, wd, L = 0.1, 1e-3, 4.0
    target = theory.equilibrium_norm_sq_sgd(L, lr, wd)
    x, steps = 4 * target, 0
    tau = theory.relaxation_steps(lr, wd)
    while abs(x - target) > abs(4 * target - target) * math.exp(-1):
        x = (1 - 2 * wd * lr) * x + L * lr**2 / x
        steps += 1
    # linearised rate near equilibrium is 4λη; far away the approach is slower, within a factor 2
    assert tau * 0.8 < steps < tau * 2.0


class _Opt:  # stand-ins for class-name recognition of third-party optimizers
    pass


class Lion(_Opt):
    pass


class AdamW(_Opt):
    pass


def test_from_param_group_recognises_families():
    p = [torch.nn.Parameter(torch.zeros(2))]
    sgd = torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4)
    t = theory.from_param_group(sgd, sgd.param_groups[0])
    assert t.family == "sgdm" and t.angular_update == pytest.approx(theory.angular_update_sgdm(0.1, 1e-4, 0.9))
    plain = torch.optim.SGD(p, lr=0.1, weight_decay=1e-4)
    assert theory.from_param_group(plain, plain.param_groups[0]).family == "sgd"
    damp = torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=1e-4)
    td = theory.from_param_group(damp, damp.param_groups[0])
    assert td.angular_update == pytest.approx(theory.angular_update_sgdm(0.05, 1e-4, 0.9))
    adamw = torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05)
    assert theory.from_param_group(adamw, adamw.param_groups[0]).family == "adamw"
    adam_dec = torch.optim.Adam(p, lr=1e-3, weight_decay=0.05, decoupled_weight_decay=True)
    assert theory.from_param_group(adam_dec, adam_dec.param_groups[0]).family == "adamw"
    lion = theory.from_param_group(Lion(), {"lr": 1e-4, "weight_decay": 1.0, "betas": (0.9, 0.99)})
    assert lion.family == "lion" and lion.angular_update == pytest.approx(theory.angular_update_lion(1e-4, 1.0, 0.9, 0.99))
    timm_adamw = theory.from_param_group(AdamW(), {"lr": 1e-3, "weight_decay": 0.05, "betas": (0.9, 0.999)})
    assert timm_adamw.family == "adamw"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4), "coupled L2"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "weight_decay=0"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "weight_decay=0"),
        (lambda p: torch.optim.Muon([torch.nn.Parameter(torch.zeros(2, 2))], weight_decay=0.0), "weight_decay=0"),
        (lambda p: torch.optim.RMSprop(p, lr=0.1, weight_decay=1e-4), "no equilibrium formula"),
    ],
)
def test_from_param_group_no_formula_has_reason(make, match):
    opt = make([torch.nn.Parameter(torch.zeros(2))])
    t = theory.from_param_group(opt, opt.param_groups[0])
    assert t.family == "none" and t.angular_update is None and t.equilibrium_norm_sq(1.0) is None
    assert match in t.reason


def test_group_theory_steps_between_stages():
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4)
    before = theory.from_param_group(opt, opt.param_groups[0])
    opt.param_groups[0]["lr"] = 0.01
    after = theory.from_param_group(opt, opt.param_groups[0])
    assert after.steps_to_equilibrium_from(before) == theory.steps_to_equilibrium(0.1, 0.01, 1e-4, momentum=0.9)


def test_equilibrium_ratio_is_corollary_k():
    # LR ÷10: k = 10; a λ doubling at fixed η also moves ‖w*‖⁴ ∝ η/λ: k = 2
    assert theory.equilibrium_ratio(0.1, 0.01, 1e-4) == pytest.approx(10.0)
    assert theory.equilibrium_ratio(0.1, 0.1, 1e-4, 2e-4) == pytest.approx(2.0)
    assert theory.equilibrium_ratio(0.01, 0.1, 1e-4) == pytest.approx(0.1)  # a rise
    for lr_old, lr_new, wd_old, wd_new in [(0.1, 0.01, 1e-4, 1e-4), (0.2, 0.05, 1e-3, 5e-4), (0.02, 0.002, 1e-4, 1e-4)]:
        k = theory.equilibrium_ratio(lr_old, lr_new, wd_old, wd_new)
        assert theory.rescale_factor(lr_old, lr_new, wd_old, wd_new) == pytest.approx(k ** -0.25)
        assert theory.steps_to_equilibrium(lr_old, lr_new, wd_old, wd_new, 0.9) == math.ceil(
            math.log(k) * 0.1 / (4 * wd_new * lr_new))
    with pytest.raises(ValueError, match="lr_new"):
        theory.equilibrium_ratio(0.1, 0.0, 1e-4)


def test_settling_steps():
    assert theory.settling_steps(0.1, 1e-4, 0.9) == 7500  # 3 × (1 − 0.9)/(4·1e-4·0.1), no float overshoot
    assert theory.settling_steps(0.2, 5e-3, 0.0, time_constants=1.0) == 250
    assert theory.settling_steps(0.3, 1e-3, 0.0) == math.ceil(3 / (4 * 1e-3 * 0.3) - 1e-6)  # 2500
    # = Corollary 3.1 for k = e^n
    n, lr, wd, mom = 2.5, 0.05, 1e-3, 0.5
    assert abs(theory.settling_steps(lr, wd, mom, n)
               - theory.steps_to_equilibrium(lr * math.exp(n), lr, wd, momentum=mom)) <= 1  # ceil of a rounded log
    with pytest.raises(ValueError, match="time_constants"):
        theory.settling_steps(0.1, 1e-4, time_constants=0)
    # the SGD norm recursion from a start 2x off: within ~e^-3 of the initial distance after 3τ, not after 1τ
    lr, wd, L = 0.1, 1e-3, 4.0
    target = theory.equilibrium_norm_sq_sgd(L, lr, wd)
    for x0 in (2 * target, 0.5 * target):
        x, dist = x0, []
        for _ in range(theory.settling_steps(lr, wd)):
            x = (1 - 2 * wd * lr) * x + L * lr**2 / x
            dist.append(abs(x - target) / abs(x0 - target))
        assert dist[-1] < 2 * math.exp(-3)
        assert dist[len(dist) // 3] > math.exp(-3)
