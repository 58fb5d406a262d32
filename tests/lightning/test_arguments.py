"""``SMDCallback``'s constructor: the everyday arguments flat, the advanced knobs in frozen options
dataclasses; every bad value refused at construction, naming the argument or the dataclass field;
the Hydra config ``conf/smd/`` mirrors the signature, nested groups included."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

import pytest
import yaml

from lightning_smd import (DetectionOptions, EquilibriumOptions, EstimateOptions, RescalePolicy, SMDCallback,
                           SMDMonitor)
from lightning_smd.lightning import arguments

ROOT = Path(__file__).resolve().parents[2]
GROUPS = {"detection": DetectionOptions, "estimates": EstimateOptions, "equilibrium": EquilibriumOptions}


@pytest.mark.parametrize("argument, value", [
    ("rescale", 1), ("rescale", "sometimes"), ("rescale", {"min_drop": 4.0}), ("figures_dir", 123),
    ("figures_every_n_steps", 2.5), ("figures_every_n_steps", 0), ("verbose", "yes"), ("log_every_n_steps", 0),
    ("per_channel", 0), ("warm_start", -3), ("warmup_steps", -1), ("include", "(unclosed"),
])
def test_bad_value_is_refused_naming_the_argument(argument, value):
    with pytest.raises(ValueError, match=rf"SMDCallback\({argument}="):
        SMDCallback(**{argument: value})


@pytest.mark.parametrize("argument", sorted(GROUPS))
@pytest.mark.parametrize("value", [{"steps": 5}, None, "auto", RescalePolicy()])
def test_group_of_the_wrong_type_is_refused_naming_the_argument(argument, value):
    with pytest.raises(TypeError, match=rf"SMDCallback\({argument}=\.\.\.\) must be a lightning_smd\."
                                        rf"{GROUPS[argument].__name__}\("):
        SMDCallback(**{argument: value})


def test_flat_names_of_the_grouped_knobs_are_gone():
    """Unreleased (0.x): no deprecated aliases; the old flat names are unknown arguments."""
    for old in ("detect", "detect_steps", "radial_threshold", "ema_steps", "unit_grad_every", "equilibrium_window",
                "equilibrium_tolerance", "rescale_min_drop", "rescale_min_lr_ratio", "rescale_on_increase"):
        with pytest.raises(TypeError, match=old):
            SMDCallback(**{old: 1})


def test_a_bad_field_is_refused_where_the_group_is_built():
    with pytest.raises(ValueError, match=r"^EquilibriumOptions\(window=\.\.\.\) must be an int >= 1, got 0$"):
        SMDCallback(equilibrium=EquilibriumOptions(window=0))
    with pytest.raises(ValueError, match=r"^RescalePolicy\(min_drop=\.\.\.\) must be a number > 1"):
        SMDCallback(rescale=RescalePolicy(min_drop=0.5))


def test_good_values_pass_and_reach_the_engine():
    cb = SMDCallback(rescale=RescalePolicy("equilibrium", min_drop=1.5), detection=DetectionOptions(steps=5),
                     estimates=EstimateOptions(unit_grad_every=2), equilibrium=EquilibriumOptions(window=50))
    assert cb.policy == RescalePolicy("equilibrium", min_drop=1.5) and cb.rescale == "equilibrium"
    assert cb.detect_steps == 5 and cb.unit_grad_every == 2 and cb.equilibrium.window == 50
    assert SMDCallback(rescale=True).policy == SMDCallback(rescale="drop").policy == RescalePolicy()
    assert SMDCallback(rescale="continuous").policy == RescalePolicy("continuous")
    assert SMDCallback().policy is None
    for kwargs in ({"figures_dir": Path("/tmp/smd"), "figures_every_n_steps": 100}, {"per_channel": 10},
                   {"warmup_steps": 0}, {"verbose": 2}):
        SMDCallback(**kwargs)


def test_the_monitor_takes_the_same_options_and_names_itself():
    import torch

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"SMDMonitor\(equilibrium=\.\.\.\)"):
        SMDMonitor(model, optimizer, equilibrium={"window": 5})
    with pytest.raises(TypeError, match="unknown option.*equilibrium_window"):
        SMDMonitor(model, optimizer, equilibrium_window=5)
    SMDMonitor(model, optimizer, equilibrium=EquilibriumOptions(window=5), verbose=False).close()


def test_checkpoint_record_compares_group_fields():
    """A resume compares the checkpointed run's arguments field by field; rescale=True, "drop" and
    RescalePolicy() are the same setting."""
    def record(**kw):
        return SMDCallback(**kw)._arguments

    assert record(rescale=True) == record(rescale="drop") == record(rescale=RescalePolicy())
    assert arguments.changes(record(), record(equilibrium=EquilibriumOptions(window=50))) == [
        "equilibrium.window=200 → 50"]
    assert arguments.changes(record(rescale=True), record(rescale=RescalePolicy(min_drop=4.0))) == [
        "rescale.min_drop=2.0 → 4.0"]
    assert arguments.changes(record(), record(rescale="equilibrium")) == ["rescale=False → 'equilibrium'"]
    assert arguments.changes(record(), record(verbose=False, figures_dir="x")) == []  # presentation only


@pytest.mark.parametrize("cls, field, value", [
    (DetectionOptions, "mode", "both"), (DetectionOptions, "steps", 0), (DetectionOptions, "radial_threshold", -1.0),
    (EstimateOptions, "ema_steps", float("nan")), (EstimateOptions, "unit_grad_every", 2.5),
    (EquilibriumOptions, "tolerance", 1.0), (EquilibriumOptions, "window", True),
    (RescalePolicy, "mode", "sometimes"), (RescalePolicy, "min_drop", "2"), (RescalePolicy, "min_lr_ratio", 2.0),
    (RescalePolicy, "on_increase", 1),
])
def test_options_dataclasses_validate_their_fields(cls, field, value):
    """Each advanced knob is validated once, by the frozen dataclass that defines it."""
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\({field}=\.\.\.\) "):
        cls(**{field: value})
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cls(), field, value)
    with pytest.raises(ValueError, match=rf"{cls.__name__}\({field}="):
        dataclasses.replace(cls(), **{field: value})


def test_modes_are_literal_types():
    for cls, field in ((DetectionOptions, "mode"), (RescalePolicy, "mode")):
        hint = typing.get_type_hints(cls)[field]
        assert typing.get_origin(hint) is typing.Literal, hint
        for mode in typing.get_args(hint):
            cls(**{field: mode})


def _check_group(node: dict, cls: type, where: str) -> None:
    assert node.pop("_target_") == f"lightning_smd.{cls.__name__}", where
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    assert node == defaults, (where, node, defaults)


def test_hydra_config_mirrors_the_signature():
    """conf/smd/default.yaml holds every argument, with the signature's default (figures_dir: the run
    dir), and each group as a node of its dataclass with every field at its default; conf/smd/rescale.yaml
    holds the RescalePolicy the same way."""
    config = yaml.safe_load((ROOT / "conf" / "smd" / "default.yaml").read_text())
    assert config.pop("_target_") == "lightning_smd.SMDCallback"
    parameters = {k: p.default for k, p in inspect.signature(SMDCallback.__init__).parameters.items() if k != "self"}
    assert set(config) == set(parameters), (sorted(set(parameters) - set(config)), sorted(set(config) - set(parameters)))
    for name, default in parameters.items():
        if name in GROUPS:
            assert default == GROUPS[name](), name
            _check_group(config[name], GROUPS[name], f"default.yaml {name}")
        elif name != "figures_dir":
            assert config[name] == default, (name, config[name], default)
    rescale = yaml.safe_load((ROOT / "conf" / "smd" / "rescale.yaml").read_text())
    _check_group(rescale["rescale"], RescalePolicy, "rescale.yaml rescale")


@pytest.mark.parametrize("preset, expected", [
    ("default", {}), ("rescale", {"rescale": RescalePolicy()}),
    ("equilibrium", {"rescale": RescalePolicy("equilibrium")}), ("warm_start", {"warm_start": True}),
])
def test_hydra_presets_build_the_callback(tmp_path, preset, expected):
    """Hydra composes conf/smd/<preset> and instantiates it as examples/train.py does: the same
    callback as the Python call."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf" / "smd"), version_base="1.3"):
        cfg = compose(config_name=preset, overrides=[f"figures_dir={tmp_path}"])
    built = instantiate(OmegaConf.to_container(cfg, resolve=True), _convert_="all")
    assert isinstance(built, SMDCallback) and isinstance(built.policy, (RescalePolicy, type(None)))
    assert built._arguments == SMDCallback(**expected)._arguments
