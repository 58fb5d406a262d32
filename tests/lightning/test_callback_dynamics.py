"""The callback on real fits: logged Δ_t and ‖w_t‖ reach the SMD theory (SMD_THEORY §3, §5)."""


import pytest

from lightning_smd import EstimateOptions, SMDCallback, theory
from tests.helpers import fit, mean_over, read_metrics
from tests.models import DigitsCNN, NoisyRayleighQuotient

NAME = "X"


@pytest.mark.slow  # over 7 s on 2 cores
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_nrq_reaches_equilibrium(tmp_path, momentum):
    lr, wd, p, sigma = 0.1, 5e-3, 64, 1.0
    # start close to the equilibrium norm so 3000 steps suffice
    L = (p - 1) * sigma**2
    if momentum:
        start = theory.equilibrium_norm_sq_sgdm(L, lr, wd, momentum) ** 0.5
    else:
        start = theory.equilibrium_norm_sq_sgd(L, lr, wd) ** 0.5
    module = NoisyRayleighQuotient(p=p, sigma=sigma, lr=lr, weight_decay=wd, momentum=momentum, init_norm=start * 0.7)
    trainer = fit(module, tmp_path, [SMDCallback(log_every_n_steps=1, estimates=EstimateOptions(ema_steps=500))], max_steps=3000)
    m = read_metrics(trainer)
    delta_star = theory.angular_update_sgdm(lr, wd, momentum) if momentum else theory.angular_update_sgd(lr, wd)
    assert m[f"smd/angular_update_theory/{NAME}"][2000] == pytest.approx(delta_star)
    assert mean_over(m[f"smd/angular_update/{NAME}"], 1500) == pytest.approx(delta_star, rel=0.03)
    norm = mean_over(m[f"smd/weight_norm/{NAME}"], 1500)
    predicted = mean_over(m[f"smd/weight_norm_theory/{NAME}"], 1500)
    assert norm == pytest.approx(predicted, rel=0.03)
    # and the prediction is the noise-dominated closed form of §5 (L ≈ (p−1)σ² + ‖PAX̃‖²)
    assert predicted == pytest.approx(start, rel=0.05)
    ratio = mean_over(m["smd/angular_update_ratio/mean"], 1500)
    assert ratio == pytest.approx(1.0, rel=0.03)


@pytest.mark.slow
def test_digits_bn_cnn_conv_weights_follow_theory(tmp_path):
    lr, wd, momentum = 0.1, 5e-3, 0.9
    cb = SMDCallback(log_every_n_steps=5)
    # label + input noise keep the unit gradient stationary (the clean set is memorized within 300 steps)
    module = DigitsCNN(lr=lr, weight_decay=wd, momentum=momentum, label_noise=0.3, input_noise=0.5)
    trainer = fit(module, tmp_path, [cb], max_steps=600, log_every_n_steps=5)
    m = read_metrics(trainer)
    convs = {"model.0.weight", "model.3.weight", "model.7.weight"}
    assert set(cb.candidates) == convs
    assert not any(k.endswith("model.11.weight") for k in m)  # classifier is not scale-invariant
    delta_star = theory.angular_update_sgdm(lr, wd, momentum)
    for name in convs:
        measured = mean_over(m[f"smd/angular_update/{name}"], 400)
        assert measured == pytest.approx(delta_star, rel=0.15), name
    # the step axis is Lightning's: logged where Lightning logs (every 5th step, 0-based 4, 9, ...)
    steps = sorted(m["smd/angular_update/model.0.weight"])
    assert all((s + 1) % 5 == 0 for s in steps) and steps[-1] == 599
    assert set(steps) <= set(m["train_loss"])
