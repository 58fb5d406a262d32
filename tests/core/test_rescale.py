"""Rescale at LR drops (SMD_THEORY §4): policy, optimizer state, dynamics, resume, escape."""

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_smd import EquilibriumOptions, SMDCallback, theory
from lightning_smd.core.rescale import RescalePolicy, rescale_
from tests.helpers import fit, mean_over, read_metrics
from tests.models import DigitsCNN, NoisyRayleighQuotient


def test_policy_drop_mode():
    policy = RescalePolicy("drop", min_drop=2.0)
    assert policy.factor((0.1, 1e-4), (0.01, 1e-4), 0.1) == pytest.approx(10**-0.25)
    assert policy.factor((0.1, 1e-4), (0.01, 1e-4), 0.1, exponent=0.5) == pytest.approx(10**-0.5)  # AdamW/Lion/Muon
    assert policy.factor((0.1, 1e-4), (0.1, 2e-4), 0.1) == pytest.approx(0.5**0.25)  # λ doubles: ηλ/(η'λ') = 1/2
    assert policy.factor((0.1, 1e-4), (0.099, 1e-4), 0.1) is None  # small cosine-like change
    assert policy.factor((0.01, 1e-4), (0.1, 1e-4), 0.1) is None  # warmup / increase
    assert RescalePolicy("drop", on_increase=True).factor((0.01, 1e-4), (0.1, 1e-4), 0.1) == pytest.approx(10**0.25)
    assert policy.factor((0.1, 0.0), (0.01, 0.0), 0.1) is None  # no weight decay: no equilibrium to move to


def test_policy_continuous_mode_floors_the_lr():
    policy = RescalePolicy("continuous", min_lr_ratio=1e-2)
    assert policy.factor((0.1, 1e-4), (0.099, 1e-4), 0.1) == pytest.approx((0.099 / 0.1) ** 0.25)
    # cosine to zero: the cumulative factor over the whole decay stops at min_lr_ratio^(1/4)
    lrs = [0.1 * 0.5 * (1 + math.cos(math.pi * t / 100)) for t in range(101)]
    total = 1.0
    for old, new in zip(lrs, lrs[1:]):
        f = policy.factor((old, 1e-4), (new, 1e-4), 0.1)
        total *= f if f is not None else 1.0
    assert total == pytest.approx(1e-2**0.25, rel=1e-6)


@pytest.mark.parametrize("bad", [{"mode": "sometimes"}, {"min_drop": 1.0}, {"min_lr_ratio": 0.0}])
def test_policy_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match=rf"RescalePolicy\({next(iter(bad))}="):
        RescalePolicy(**bad)


def test_rescale_moves_optimizer_state_to_the_new_scale():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    for opt in (torch.optim.SGD([w], lr=0.1, momentum=0.9), torch.optim.AdamW([w], lr=1e-3, amsgrad=True)):
        w.grad = torch.randn(8, 4)
        opt.step()
        before_w = w.detach().clone()
        before = {k: v.clone() for k, v in opt.state[w].items() if torch.is_tensor(v) and v.shape == w.shape}
        untouched = rescale_([w], 0.5, opt)
        assert untouched == set()
        assert torch.allclose(w, before_w * 0.5)
        for key, value in before.items():
            power = 2 if key.endswith("sq") else 1
            assert torch.allclose(opt.state[w][key], value / 0.5**power), key


def test_rescale_reports_unknown_state():
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adagrad([w], lr=0.1)
    w.grad = torch.randn(3)
    opt.step()
    assert rescale_([w], 0.5, opt) == {"sum"}


def _nrq_drop_run(tmp_path, rescale, **kw):
    drop = 300
    module = NoisyRayleighQuotient(p=64, sigma=1.0, lr=0.1, weight_decay=0.05, milestones=[drop], gamma=0.1,
                                   init_norm=2.0, **kw)
    cb = SMDCallback(log_every_n_steps=1, rescale=rescale, equilibrium=EquilibriumOptions(window=100), verbose=False)
    trainer = fit(module, tmp_path / str(rescale), [cb], max_steps=drop + 2600)
    return drop, cb, read_metrics(trainer), module


@pytest.mark.slow
def test_nrq_rescale_keeps_angular_update_at_theory_after_drop(tmp_path):
    lr, wd, k = 0.1, 0.05, 10
    new_star = theory.angular_update_sgd(lr / k, wd)
    predicted = theory.steps_to_equilibrium(lr, lr / k, wd)  # Corollary 3.1: ⌈log(10)/(4λη')⌉ = 1152
    assert predicted == 1152

    drop, cb, m, _ = _nrq_drop_run(tmp_path, rescale=True)
    delta = m["smd/angular_update/X"]
    assert m["smd/angular_update_theory/X"][drop + 1] == pytest.approx(new_star)
    assert [e["step"] for e in cb.rescale_events] == [drop]
    assert m["smd/rescale_factor"] == {drop: pytest.approx(k**-0.25)}
    # right after the drop, and over the next few hundred steps: within 10 % of the new Δ*
    assert mean_over(delta, drop, drop + 20) == pytest.approx(new_star, rel=0.1)
    assert mean_over(delta, drop, drop + 300) == pytest.approx(new_star, rel=0.1)
    # equilibrium tracking: predicted steps logged at the change, measured ≈ 0 with rescale
    assert m["smd/steps_to_equilibrium/predicted/pg0"] == {drop: float(predicted)}
    measured = m["smd/steps_to_equilibrium/measured/X"]
    assert list(measured.values())[-1] < 0.2 * predicted

    drop, cb, m, _ = _nrq_drop_run(tmp_path, rescale=False)
    delta = m["smd/angular_update/X"]
    assert cb.rescale_events == [] and "smd/rescale_factor" not in m
    # without: far below the new Δ* for a good part of the Corollary 3.1 time...
    assert mean_over(delta, drop, drop + 300) < 0.6 * new_star
    assert mean_over(delta, drop + predicted // 2, drop + predicted // 2 + 100) < 0.85 * new_star
    # ...reaching it only on the order of that time
    measured = list(m["smd/steps_to_equilibrium/measured/X"].values())[-1]
    assert 0.8 * predicted < measured < 2.5 * predicted


@pytest.mark.slow
def test_digits_bn_cnn_rescale_after_drop(tmp_path):
    lr, wd, momentum, drop = 0.1, 5e-3, 0.9, 300
    new_star = theory.angular_update_sgdm(lr / 10, wd, momentum)
    convs = ["model.0.weight", "model.3.weight", "model.7.weight"]
    old_star = theory.angular_update_sgdm(lr, wd, momentum)
    results, before = {}, {}
    for rescale in (True, False):
        pl.seed_everything(0)  # the same init and input noise for both runs (and every run of the test)
        module = DigitsCNN(lr=lr, weight_decay=wd, momentum=momentum, milestones=[drop], gamma=0.1, label_noise=0.3,
                           input_noise=0.5)
        cb = SMDCallback(log_every_n_steps=2, rescale=rescale, verbose=False)
        trainer = fit(module, tmp_path / str(rescale), [cb], max_steps=drop + 300, log_every_n_steps=2)
        m = read_metrics(trainer)
        results[rescale] = [mean_over(m[f"smd/angular_update/{n}"], drop, drop + 250) / new_star for n in convs]
        before[rescale] = [mean_over(m[f"smd/angular_update/{n}"], drop - 200, drop - 1) / old_star for n in convs]
    # Before the drop each conv sits near its equilibrium (within a few %, not exactly: a small layer's
    # own noise); the rescale keeps Δ/Δ* where it was across the drop, the plain drop divides it by ~3.
    # 200 steps before the drop: over 100 the first conv's window mean moved by 6 % with the thread
    # count alone (0.934 on 1 thread, 0.986 on 2), over 200 by 2 % (0.997, 1.016).
    for ratio, was in zip(results[True], before[True]):
        assert was == pytest.approx(1.0, rel=0.1)
        assert ratio / was == pytest.approx(1.0, rel=0.1)
    for ratio in results[False]:
        assert ratio < 0.7


@pytest.mark.slow  # over 7 s on 2 cores
@pytest.mark.parametrize("resume_at", [300, 320])  # checkpoint with the new LR but before the rescale / after it
def test_resume_across_drop_neither_skips_nor_repeats(tmp_path, resume_at):
    drop, total = 300, 400
    kw = dict(p=16, sigma=0.5, lr=0.1, weight_decay=0.05, milestones=[drop], gamma=0.1, init_norm=2.0)

    straight = NoisyRayleighQuotient(**kw)
    cb = SMDCallback(log_every_n_steps=10, rescale=True, verbose=False)
    fit(straight, tmp_path / "straight", [cb], max_steps=total)
    assert [e["step"] for e in cb.rescale_events] == [drop]

    first = NoisyRayleighQuotient(**kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=resume_at, save_top_k=-1)
    fit(first, tmp_path / "first", [SMDCallback(log_every_n_steps=10, rescale=True, verbose=False), ckpt],
        max_steps=resume_at, enable_checkpointing=True)
    path = tmp_path / "ckpt" / f"epoch=0-step={resume_at}.ckpt"
    state = torch.load(path, weights_only=False)
    (smd_state,) = [v for k, v in state["callbacks"].items() if k.startswith("SMDCallback")]
    assert len(smd_state["rescale_events"]) == (1 if resume_at > drop else 0)

    resumed = NoisyRayleighQuotient(**kw)
    cb2 = SMDCallback(log_every_n_steps=10, rescale=True, verbose=False)
    fit(resumed, tmp_path / "resumed", [cb2], max_steps=total, ckpt_path=str(path))
    assert [e["step"] for e in cb2.rescale_events] == [drop]  # exactly once, at the drop
    torch.testing.assert_close(resumed.X.detach(), straight.X.detach())
    # the running L estimate continued instead of restarting
    assert cb2.unit_grad.get("X") == pytest.approx(cb.unit_grad.get("X"), rel=1e-6)


@pytest.mark.slow
def test_escape_without_rescale_and_not_with_it(tmp_path):
    """Seed 002, Fig. 2(e)-(h): after an LR drop the risk goes down then up without rescale; not with it."""
    drop, total = 500, 2000
    curves = {}
    for rescale in (False, True):
        module = NoisyRayleighQuotient(p=16, sigma=0.1, lr=1.0, weight_decay=0.01, milestones=[drop], gamma=0.1,
                                       trials=64, init_norm=1.0)
        fit(module, tmp_path / str(rescale), [SMDCallback(log_every_n_steps=50, rescale=rescale, verbose=False)],
            max_steps=total, log_every_n_steps=50)
        risks = module.risks
        window = lambda a, b: sum(risks[a:b]) / (b - a)  # noqa: E731
        curves[rescale] = {"dip": min(window(s, s + 50) for s in range(drop, total - 50, 50)),
                           "final": window(total - 500, total)}
    plain, rescaled = curves[False], curves[True]
    assert plain["dip"] < 0.7 * plain["final"]  # down, then back up: the escape
    assert rescaled["dip"] > 0.85 * rescaled["final"]  # straight to the new level
    assert rescaled["final"] == pytest.approx(plain["final"], rel=0.15)  # same limiting risk (same Δ*)
