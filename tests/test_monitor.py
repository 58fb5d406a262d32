"""``SMDMonitor`` in a plain PyTorch loop: the same ``smd/*`` series as ``SMDCallback`` in a Trainer
(same seed, data and optimizer), a resume that continues the run, and ``close()`` leaving no hook."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_smd import EstimateOptions, SMDMonitor
from tests.setups_common import GLOBAL_BATCH, TinyNet, dataset, metrics_of, run_setup

STEPS = 12
OPTIONS = {"log_every_n_steps": 1, "estimates": EstimateOptions(unit_grad_every=1), "verbose": False}


def _plain_loop(monitor_state=None, start=0, stop=STEPS, model=None, optimizer=None):
    model = model or TinyNet(steps=STEPS)  # seeded in its constructor
    optimizer = optimizer or model.configure_optimizers()
    monitor = SMDMonitor(model, optimizer, **OPTIONS)
    if monitor_state is not None:
        monitor.load_state_dict(monitor_state)
    x_all, y_all = dataset(STEPS).tensors
    series: dict[str, dict[int, float]] = {}
    for i in range(start, stop):
        x, y = x_all[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH], y_all[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH]
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for step, metrics in monitor.pop_metrics().items():
            for key, value in metrics.items():
                series.setdefault(key, {})[step] = value
    return series, monitor, model, optimizer


def test_plain_loop_gives_the_trainers_series(tmp_path):
    run_setup(tmp_path, "trainer", steps=STEPS)
    trainer_series = {k: v for k, v in metrics_of(tmp_path, "trainer").items() if k.startswith("smd/")}
    loop_series, monitor, *_ = _plain_loop()
    monitor.close()
    assert set(loop_series) == set(trainer_series)
    assert len(trainer_series["smd/angular_update/net.0.weight"]) >= 6
    for key, by_step in trainer_series.items():
        assert sorted(loop_series[key]) == sorted(by_step), key
        for step, value in by_step.items():
            assert loop_series[key][step] == pytest.approx(value, rel=1e-5, abs=1e-9), (key, step)


def test_resume_continues_and_close_removes_every_hook():
    whole, monitor, *_ = _plain_loop()
    monitor.close()
    first, monitor, model, optimizer = _plain_loop(stop=7)
    state = monitor.state_dict()
    monitor.close()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert not model._forward_pre_hooks and not model._forward_hooks
    rest, monitor, *_ = _plain_loop(state, start=7, model=model, optimizer=optimizer)
    assert monitor.candidates.keys() == {"net.0.weight", "net.3.weight"}  # restored, not re-detected
    monitor.close()
    key = "smd/unit_grad_sq/net.0.weight"
    assert sorted(rest[key]) == list(range(7, STEPS))
    for step in range(7, STEPS):  # the running L continued from the checkpoint
        assert rest[key][step] == pytest.approx(whole[key][step], rel=1e-6)


def test_bad_arguments_are_refused():
    model = TinyNet(steps=STEPS)
    with pytest.raises(TypeError, match="optimizers"):
        SMDMonitor(model, [model])
    with pytest.raises(ValueError, match="rescale"):
        SMDMonitor(model, model.configure_optimizers(), rescale="sometimes")


def test_fabric_loop_names_the_users_parameters():
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    model, optimizer = fabric.setup(model, optimizer)
    monitor = SMDMonitor(model, optimizer, **OPTIONS)
    logged = {}
    for _ in range(8):
        x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
        fabric.backward(nn.functional.cross_entropy(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
        logged.update(monitor.pop_metrics())
    monitor.close()
    assert set(monitor.candidates) == {"0.weight"}
    assert sorted(logged) == [4, 5, 6, 7]
    assert all(0 < m["smd/angular_update/0.weight"] < 0.2 for m in logged.values())


def _loop_with_drop(steps, start=0, resume=None):
    """SGD with momentum, LR ×0.1 after the first step, ``rescale=True``: the drop is seen at step 1,
    before detection decides (step 3), so its rescale is deferred until then."""
    model = TinyNet(optimizer="sgdm", steps=STEPS, milestones=(1,))
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
    monitor = SMDMonitor(model, optimizer, rescale=True, **OPTIONS)
    if resume is not None:
        monitor.load_state_dict(resume["smd"])
    x_all, y_all = dataset(STEPS).tensors
    for i in range(start, steps):
        batch = slice(i * GLOBAL_BATCH, (i + 1) * GLOBAL_BATCH)
        nn.functional.cross_entropy(model(x_all[batch]), y_all[batch]).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        monitor.pop_metrics()
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "smd": monitor.state_dict()}
    monitor.close()
    return model, monitor, copy.deepcopy(saved)


@pytest.mark.filterwarnings("ignore:SMDCallback")  # the deferred rescale, and the one still owed at step 2
def test_resume_during_detection_is_bit_equal():
    straight, straight_monitor, _ = _loop_with_drop(10)
    assert [e["step"] for e in straight_monitor.rescale_events] == [3]  # deferred to detection's decision
    _, _, saved = _loop_with_drop(2)  # stopped during detection, the rescale owed
    assert saved["smd"]["smd"]["tracked"] is None and saved["smd"]["smd"]["deferred_rescales"]
    resumed, monitor, _ = _loop_with_drop(10, start=2, resume=saved)
    assert [e["step"] for e in monitor.rescale_events] == [3]
    assert monitor.candidates == straight_monitor.candidates
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
