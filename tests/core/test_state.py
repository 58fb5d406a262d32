"""``SMDState``, the one object a checkpoint keeps: plain data through ``torch.load(weights_only=True)``,
``reset`` forgets everything, unknown formats are refused, and detection's progress continues exactly."""

from __future__ import annotations

import io

import pytest
import torch

from lightning_smd.core.detect import Candidate, RadialCosineCheck
from lightning_smd.core.detect.api import DetectionNotes
from lightning_smd.core.state import STATE_VERSION, SMDState
from lightning_smd.core.units import Unit


def _through_a_checkpoint(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # what Lightning's trainer.fit(ckpt_path=...) does


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _busy_state() -> SMDState:
    state = SMDState(ema_steps=10.0, equilibrium_window=4, arguments={"rescale": True})
    state.unit_grad.update(["a", "b"], [1.0, 2.0], 3)
    state.update_sq.update(["a"], [0.5], 3)
    state.equilibrium.start_stage("pg0", 0, None, False, ["a", "b"])
    state.equilibrium.update(3, ["pg0", "pg0"], ["a", "b"], [1.0, 0.9])
    state.warmup.classify("pg0", (0.1, 0.01), (0.2, 0.01), 2)
    state.schedule.last_hparams["pg0"] = (0.2, 0.01)
    state.schedule.deferred["pg0"] = {"group": [0, 0], "factor": 0.5, "lr": [[0.2, 0.01], [0.02, 0.01]]}
    return state


def test_state_survives_a_weights_only_checkpoint_and_reset_forgets_it():
    state = _busy_state()
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    progress = state.detection
    progress.names = ["a", "b"]
    progress.structural = {"a": Candidate("a", "Linear → LayerNorm (n)", "structural")}
    progress.notes = DetectionNotes({"c": "bias before a norm"}, {}, {"a": 1e-6})
    progress.recorded, progress.steps = True, {0: 2}
    _grads(params, 0)
    progress.radial_check(0, list(zip("ab", params)), None).update()
    saved = _through_a_checkpoint(state.state_dict())
    assert saved["version"] == STATE_VERSION and saved["tracked"] is None

    restored = SMDState(ema_steps=10.0, equilibrium_window=4, arguments={"rescale": True})
    restored.load_state_dict(saved)
    assert restored.state_dict() == state.state_dict()
    assert restored.detection.restored and restored.detection.structural == progress.structural
    assert restored.detection.notes == progress.notes and restored.detection.radial_steps(0) == 1

    # decided: the tracked names and units are kept, detection's progress is not
    restored.detection.clear()
    restored.candidates = {"a": Candidate("a", "why", "structural")}
    restored.units = {"a": Unit(4, "channel", "BatchNorm")}
    decided = _through_a_checkpoint(restored.state_dict())
    assert decided["tracked"] == ["a"] and decided["detection"] is None
    again = SMDState(ema_steps=10.0, equilibrium_window=4, arguments={"rescale": True})
    again.load_state_dict(decided)
    assert again.pending == ["a"] and again.units == restored.units

    restored.reset()
    fresh = SMDState(ema_steps=10.0, equilibrium_window=4, arguments={"rescale": True}).state_dict()
    assert restored.state_dict() == fresh


def test_format_1_loads_and_unknown_formats_are_refused():
    saved = _busy_state().state_dict()
    saved.pop("detection")
    saved["version"] = 1  # the format before detection's progress was kept
    state = SMDState(ema_steps=10.0, equilibrium_window=4, arguments={"rescale": True})
    state.load_state_dict(saved)
    assert state.schedule.deferred and state.detection.structural is None
    with pytest.raises(ValueError, match="unknown checkpoint state version 7"):
        state.load_state_dict({**saved, "version": 7})


def test_radial_check_continued_from_a_checkpoint_gives_the_uninterrupted_maxima():
    params = [torch.nn.Parameter(torch.randn(6, 3)), torch.nn.Parameter(torch.randn(8))]
    whole = RadialCosineCheck(list(zip("ab", params)))
    first = RadialCosineCheck(list(zip("ab", params)))
    for seed in range(2):
        _grads(params, seed)
        whole.update()
        first.update()
    second = RadialCosineCheck(list(zip("ab", params)))
    second.load_state_dict(_through_a_checkpoint(first.state_dict()))
    for seed in range(2, 4):
        _grads(params, seed)
        whole.update()
        second.update()
    assert second.steps == whole.steps == 4
    assert second.result() == whole.result()


# The running-L and equilibrium parts of a format-2 checkpoint as the dict-per-tensor implementation
# (before the array-backed one) wrote them after ``_feed(state, range(0, 12, 2))``: literal data.
_DICT_ERA_UNIT_GRAD = {"mean": {"a": 0.8816218322522895, "b": 1.763243664504579},
                       "weight": {"a": 0.6671289163019205, "b": 0.6671289163019205},
                       "last_step": {"a": 10, "b": 10},
                       "square": {"a": 1.1809073320632129, "b": 4.723629328252851},
                       "weight_sq": {"a": 0.08740498343574502, "b": 0.08740498343574502},
                       "count": {"a": 6, "b": 6}}
_DICT_ERA_POINTS = {"a": [(8, 1.3), (10, 1.25)], "b": [(8, 0.8), (10, 0.85)]}


def _feed(state: SMDState, steps) -> list:
    out = []
    for step in steps:
        k = step // 2
        out.append(state.unit_grad.update(["a", "b"], [1.0 + 0.1 * k, 2.0 + 0.2 * k], step))
        out.append(state.equilibrium.update(step, ["pg0", "pg0"], ["a", "b"],
                                            [max(1.0, 1.5 - 0.05 * k), min(1.0, 0.6 + 0.05 * k)]))
    return out


def test_a_format_2_checkpoint_of_the_dict_era_resumes_bit_equal():
    straight = SMDState(ema_steps=10.0, equilibrium_window=4)
    straight.equilibrium.start_stage("pg0", 0, None, False, ["a", "b"])
    _feed(straight, range(0, 12, 2))
    saved = straight.state_dict()
    # the array-backed parts write the same format (values equal to float rounding)
    assert saved["unit_grad"].keys() == _DICT_ERA_UNIT_GRAD.keys()
    for quantity, values in _DICT_ERA_UNIT_GRAD.items():
        assert saved["unit_grad"][quantity] == pytest.approx(values, rel=1e-12)
    assert saved["equilibrium"]["points"] == _DICT_ERA_POINTS
    resumed = SMDState(ema_steps=10.0, equilibrium_window=4)
    resumed.load_state_dict(_through_a_checkpoint({**saved, "unit_grad": _DICT_ERA_UNIT_GRAD,
                                                   "equilibrium": {**saved["equilibrium"], "points": _DICT_ERA_POINTS}}))
    later = range(12, 40, 2)
    resumed_out = _feed(resumed, later)
    assert resumed_out == _feed(straight, later)
    assert any(resumed_out[1::2]), "the tensors reach equilibrium after the resume"
    assert resumed.state_dict() == straight.state_dict()
