"""Equilibrium control (issue 16): ``rescale="equilibrium"``, the ±30 % warning, ``warm_start``.

The fixed k^(-1/4) keeps Δ_t/Δ* across a drop, so it is exact only at equilibrium; the equilibrium
rescale moves each tensor to its predicted new ‖w*'‖ (from the running L) and the warm start moves
every tensor to its ‖w*‖ once, removing the transient from the initialization (NRQ paper, Cor. 3).
"""

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_smd import EquilibriumOptions, EstimateOptions, SMDCallback, theory
from lightning_smd.core.state import SMDState
from lightning_smd.core.equilibrium import EquilibriumTracker
from lightning_smd.core.schedule import ScheduleWatcher, default_warm_start_steps
from tests.helpers import fit, mean_over, read_metrics
from tests.models import DigitsCNN, NoisyRayleighQuotient

CONVS = ["model.0.weight", "model.3.weight", "model.7.weight"]


def _ratio(m, name, first, last):
    return mean_over(m[f"smd/angular_update/{name}"], first, last) / mean_over(
        m[f"smd/angular_update_theory/{name}"], first, last)


def _fit_warnings(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(*args, **kwargs)
    return trainer, [str(w.message) for w in caught if "SMDCallback" in str(w.message)]


# ------------------------------------------------------------------ theory
def test_adamw_equilibrium_norm_from_update_rms():
    lr, wd, beta1 = 1e-3, 0.1, 0.9
    star = theory.angular_update_adamw(lr, wd, beta1)
    u = 7.0  # scale-free tangential update length: the step turns by lr·u/‖w‖
    norm = theory.equilibrium_norm_from_update(u, lr, star)
    assert lr * u / norm == pytest.approx(star)  # at ‖w*‖ a step turns by Δ*
    group = theory.from_param_group(torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr / 10, weight_decay=wd),
                                    {"lr": lr / 10, "weight_decay": wd, "betas": (beta1, 0.999)})
    # an LR ÷10 at equilibrium moves ‖w*‖ by 10^(-1/2) for AdamW (10^(-1/4) for SGD)
    assert group.equilibrium_norm(None, u) / norm == pytest.approx(10**-0.5)
    assert group.norm_exponent == 0.5
    assert group.equilibrium_norm(None, None) is None


def test_default_warm_start_steps_waits_for_32_samples_of_L():
    assert default_warm_start_steps(3, every=5, unit_grad_every=8) == 3 + 1 + 32 * 8
    assert default_warm_start_steps(3, every=50, unit_grad_every=8) == 3 + 1 + 32 * 50


def test_arguments_and_unknown_checkpoints():
    with pytest.raises(ValueError, match="warm_start"):
        SMDCallback(warm_start="soon")
    with pytest.raises(ValueError, match="warm_start"):
        SMDCallback(warm_start=0)
    assert SMDCallback(rescale="equilibrium").policy.mode == "equilibrium"
    watcher = ScheduleWatcher(None, SMDState(), lambda *a: None, 3, warm_start=True)
    assert watcher.warm_start_done is False and watcher.update_rms("X") is None
    # checkpoints of versions never released are refused, naming what to do
    with pytest.raises(ValueError, match="unknown checkpoint state version 0"):
        SMDCallback().load_state_dict({"version": 0, "last_hparams": {"pg0": [0.1, 1e-3]}})


def test_window_mean_accessor():
    tracker = EquilibriumTracker(tolerance=0.1, window=10)
    tracker.start_stage("pg0", 0, None, False, ["a"])
    assert tracker.window_mean("a") is None
    for step in range(5):
        tracker.update(step, ["pg0"], ["a"], [0.5 + 0.1 * step])
    assert tracker.window_mean("a") == (pytest.approx(0.7), 5)
    tracker.start_stage("pg0", 5, None, False, ["a"])
    assert tracker.window_mean("a") is None


# ------------------------------------------------------ rescale="equilibrium"
NRQ = dict(p=64, sigma=1.0, lr=0.1, weight_decay=5e-3)  # ‖x*‖⁴ = (p − 1)σ²η/(2λ) = 630, ‖x*‖ ≈ 5.01


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_nrq_equilibrium_rescale_equals_k_quarter_at_equilibrium(tmp_path):
    drop = 300
    module = NoisyRayleighQuotient(**NRQ, init_norm=(63 * 0.1 / 1e-2) ** 0.25, milestones=[drop])
    cb = SMDCallback(log_every_n_steps=1, rescale="equilibrium", verbose=False)
    _, caught = _fit_warnings(module, tmp_path, [cb], max_steps=drop + 10)
    (event,) = cb.rescale_events
    assert event["step"] == drop and event["kind"] == "equilibrium"
    assert event["factors"]["X"] == pytest.approx(10**-0.25, rel=0.02)
    assert not [w for w in caught if "away from equilibrium" in w]


@pytest.mark.slow  # over 7 s on 2 cores
@pytest.mark.parametrize("init_norm", [20.0, 1.5])  # far above / below ‖x*‖ ≈ 5 when the LR drops
def test_nrq_drop_before_equilibrium(tmp_path, init_norm):
    drop = 150
    ratios, caught = {}, {}
    for rescale in (True, "equilibrium"):
        module = NoisyRayleighQuotient(**NRQ, init_norm=init_norm, milestones=[drop])
        cb = SMDCallback(log_every_n_steps=1, rescale=rescale, verbose=False)
        trainer, caught[rescale] = _fit_warnings(module, tmp_path / str(rescale), [cb], max_steps=drop + 40)
        m = read_metrics(trainer)
        ratios[rescale] = (_ratio(m, "X", drop - 30, drop), _ratio(m, "X", drop + 1, drop + 40))
    before, after = ratios[True]
    assert abs(before - 1) > 0.5
    assert after == pytest.approx(before, rel=0.2)  # k^(-1/4) keeps Δ_t/Δ*: still far from the new Δ*
    assert ratios["equilibrium"][1] == pytest.approx(1.0, abs=0.1)  # the equilibrium rescale puts Δ_t at Δ*
    for rescale, messages in caught.items():
        (far,) = [w for w in messages if "away from equilibrium" in w]
        assert "group pg0" in far
        listed = float(far.split("X (")[1].split(")")[0])  # the tensor's window mean of Δ_t/Δ*
        assert abs(listed - 1) > 0.3 and (listed - 1) * (before - 1) > 0
        assert ("rescale='equilibrium'" in far) and ("the estimate is stale" in far) == (rescale == "equilibrium")


@pytest.mark.slow  # over 7 s on 2 cores
def test_digits_bn_cnn_drop_before_equilibrium(tmp_path):
    # λη = 2.5e-5, momentum 0.9: relaxation time 1000 steps; the kaiming init is far below ‖w*‖ (Δ ≈ 3 Δ*)
    drop = 200
    ratios = {}
    for rescale in (True, "equilibrium"):
        pl.seed_everything(0)  # the same init for both runs
        module = DigitsCNN(lr=0.05, weight_decay=5e-4, momentum=0.9, milestones=[drop], label_noise=0.3)
        cb = SMDCallback(log_every_n_steps=5, rescale=rescale, verbose=False)
        trainer, _ = _fit_warnings(module, tmp_path / str(rescale), [cb], max_steps=drop + 60, log_every_n_steps=5)
        m = read_metrics(trainer)
        ratios[rescale] = [(_ratio(m, n, drop - 50, drop), _ratio(m, n, drop, drop + 60)) for n in CONVS]
    for before, after in ratios[True]:
        assert before > 2 and after > 2  # k^(-1/4): Δ_t stays ~3× the new Δ*
    for (before, after), (_, after_k) in zip(ratios["equilibrium"], ratios[True]):
        # With momentum the equilibrium rescale lands much closer to the new Δ* than k^(-1/4), not on
        # it: measured 1.2–1.55 against ~2.8 (the running L of SGDM, E h̃, grows after the drop).
        assert before > 2 and 1.0 < after < 1.7
        assert abs(math.log(after)) < abs(math.log(after_k)) / 2


def test_equilibrium_rescale_falls_back_to_k_quarter_before_L_is_known(tmp_path):
    # the LR drops at step 2, before detection decided: the deferred rescale has no L yet
    module = NoisyRayleighQuotient(**NRQ, init_norm=5.0, milestones=[2])
    cb = SMDCallback(log_every_n_steps=1, rescale="equilibrium", verbose=False)
    _, caught = _fit_warnings(module, tmp_path, [cb], max_steps=10)
    (event,) = cb.rescale_events
    assert event["factor"] == pytest.approx(10**-0.25)
    assert [w for w in caught if "no estimate of the new equilibrium norm yet for X" in w]


# ------------------------------------------------------------- warm start
def _steps_to_equilibrium(cb):
    """First step of the first ±10 % window of each tensor (from fit start), across stages."""
    reached = {}
    for stage in cb.equilibrium.stages:
        for name, step in stage.reached.items():
            reached.setdefault(name, step)
    return reached


@pytest.mark.slow  # over 7 s on 2 cores
def test_nrq_warm_start_removes_the_transient(tmp_path):
    # λη = 4e-3: relaxation time 62 steps; the start ‖x‖ = 10 is 2.8× ‖x*‖ (Δ ≈ Δ*/8)
    kw = dict(p=64, sigma=1.0, lr=0.1, weight_decay=4e-2, init_norm=10.0)
    steps, risks = {}, {}
    for warm in (False, True):
        module = NoisyRayleighQuotient(**kw)
        cb = SMDCallback(log_every_n_steps=2, warm_start=warm, verbose=False, estimates=EstimateOptions(unit_grad_every=2),
                         equilibrium=EquilibriumOptions(window=50))
        fit(module, tmp_path / str(warm), [cb], max_steps=500, log_every_n_steps=2)
        steps[warm] = _steps_to_equilibrium(cb)["X"]
        risks[warm] = sum(module.risks[-100:]) / 100
        if warm:
            (event,) = cb.rescale_events
            assert event["kind"] == "warm_start" and event["step"] == default_warm_start_steps(3, 2, 2) == 68
    assert steps[True] <= steps[False] / 3, steps
    print(f"NRQ steps to ±10 % equilibrium: {steps}; noise-free risk, last 100 steps: {risks}")


@pytest.mark.slow  # over 7 s on 2 cores
def test_digits_bn_cnn_warm_start_removes_the_transient(tmp_path):
    # λη = 1e-4, momentum 0.9: relaxation time 250 steps; the kaiming init is far below ‖w*‖ (Δ ≈ 2.5 Δ*).
    # Input noise keeps the gradient noise (L) stationary. The warm start waits 150 steps: before, the
    # CNN's L still moves (warm_start=True's 68 steps here leave Δ ≈ 1.15 Δ*).
    steps, final = {}, {}
    for warm in (False, 150):
        module = DigitsCNN(lr=0.1, weight_decay=1e-3, momentum=0.9, label_noise=0.3, input_noise=0.5)
        cb = SMDCallback(log_every_n_steps=2, warm_start=warm, verbose=False, estimates=EstimateOptions(unit_grad_every=2),
                         equilibrium=EquilibriumOptions(window=50))
        trainer = fit(module, tmp_path / str(warm), [cb], max_steps=700, log_every_n_steps=2)
        reached = _steps_to_equilibrium(cb)
        if warm:
            assert set(reached) == set(CONVS), reached
        # a conv not at equilibrium by the end: its first full window starts after 700 - 50 (a lower bound)
        steps[warm] = max(reached.get(name, 700 - 50 + 1) for name in CONVS)
        final[warm] = mean_over(read_metrics(trainer)["train_loss"], 600)
    # the transient left after the warm start (from step 150) against the cold run's (from step 0): measured
    # 49 vs 651 (1 thread, this machine), 89 vs 651 (CI's machine; the numerics move with the CPU's kernels)
    assert steps[150] - 150 <= steps[False] / 4, steps
    print(f"digits CNN steps to ±10 % equilibrium (slowest conv): {steps}; train loss, last 100 steps: {final}")


@pytest.mark.slow  # over 7 s on 2 cores
@pytest.mark.parametrize("resume_at", [40, 80])  # checkpoint before / after the warm start at step 60
def test_warm_start_exactly_once_across_resume(tmp_path, resume_at):
    kw = dict(p=16, sigma=0.5, lr=0.1, weight_decay=0.05, init_norm=4.0)
    total = 120

    def callback():
        return SMDCallback(log_every_n_steps=2, warm_start=60, verbose=False, estimates=EstimateOptions(unit_grad_every=2))

    straight = NoisyRayleighQuotient(**kw)
    cb = callback()
    fit(straight, tmp_path / "straight", [cb], max_steps=total)
    assert [e["step"] for e in cb.rescale_events] == [60]

    first = NoisyRayleighQuotient(**kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=resume_at, save_top_k=-1)
    fit(first, tmp_path / "first", [callback(), ckpt], max_steps=resume_at, enable_checkpointing=True)
    resumed = NoisyRayleighQuotient(**kw)
    cb2 = callback()
    fit(resumed, tmp_path / "resumed", [cb2], max_steps=total,
        ckpt_path=str(tmp_path / "ckpt" / f"epoch=0-step={resume_at}.ckpt"))
    assert [e["step"] for e in cb2.rescale_events] == [60]  # neither repeated nor skipped
    assert cb2._engine.schedule.warm_start_done
    torch.testing.assert_close(resumed.X.detach(), straight.X.detach())


@pytest.mark.parametrize("preset, key, value", [("equilibrium", "rescale", "equilibrium"), ("warm_start", "warm_start", True)])
def test_presets_build_the_callback(tmp_path, preset, key, value):
    from hydra.utils import instantiate

    from tests.examples_fixtures import composed

    with composed(["experiment=quickstart", f"smd={preset}"], tmp_path) as cfg:
        assert (cfg.smd.rescale.mode if key == "rescale" else cfg.smd[key]) == value  # smd=equilibrium: a RescalePolicy node
        smd = instantiate({k: v for k, v in cfg.smd.items() if k != "enabled"})
        assert getattr(smd._engine.schedule, "warm_start" if key == "warm_start" else "policy") == (
            value if key == "warm_start" else smd.policy)
        if key == "rescale":
            assert smd.policy.mode == "equilibrium"
