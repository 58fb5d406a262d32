"""``SMDCallback``'s constructor refuses every bad value, naming the argument, and the Hydra config
``conf/smd/default.yaml`` mirrors its signature."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from lightning_smd import SMDCallback

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argument, value", [
    ("rescale", 1), ("rescale", "sometimes"), ("figures_dir", 123), ("rescale_min_drop", 0.5),
    ("rescale_min_drop", "2"), ("figures_every_n_steps", 2.5), ("figures_every_n_steps", 0),
    ("rescale_min_lr_ratio", 0.0), ("ema_steps", -1.0), ("equilibrium_tolerance", 0),
    ("equilibrium_window", 2.5), ("verbose", "yes"), ("rescale_on_increase", 1), ("radial_threshold", "small"),
    ("log_every_n_steps", 0), ("detect", "both"), ("per_channel", 0), ("warm_start", -3),
])
def test_bad_value_is_refused_naming_the_argument(argument, value):
    with pytest.raises(ValueError, match=rf"SMDCallback\({argument}="):
        SMDCallback(**{argument: value})


def test_good_values_pass():
    for kwargs in ({"rescale": True}, {"rescale": "equilibrium", "rescale_min_drop": 1.5},
                   {"figures_dir": Path("/tmp/smd"), "figures_every_n_steps": 100}, {"per_channel": 10}):
        SMDCallback(**kwargs)


def test_hydra_config_mirrors_the_signature():
    config = yaml.safe_load((ROOT / "conf" / "smd" / "default.yaml").read_text())
    keys = set(config) - {"_target_"}
    parameters = set(inspect.signature(SMDCallback.__init__).parameters) - {"self"}
    assert keys == parameters, (sorted(parameters - keys), sorted(keys - parameters))


@pytest.mark.parametrize("cls, field, value", [
    ("DetectionOptions", "mode", "both"), ("DetectionOptions", "steps", 0), ("DetectionOptions", "radial_threshold", -1.0),
    ("EstimateOptions", "ema_steps", float("nan")), ("EstimateOptions", "unit_grad_every", 2.5),
    ("EquilibriumOptions", "tolerance", 1.0), ("EquilibriumOptions", "window", True),
    ("RescalePolicy", "min_drop", "2"), ("RescalePolicy", "min_lr_ratio", 2.0), ("RescalePolicy", "on_increase", 1),
])
def test_options_dataclasses_validate_their_fields(cls, field, value):
    """Each advanced knob is validated once, by the frozen dataclass that defines it; the callback's
    flat argument for it is refused with the same rule, naming the argument."""
    import dataclasses

    import lightning_smd
    from lightning_smd.lightning.arguments import FLAT_OPTIONS

    options = getattr(lightning_smd, cls)
    with pytest.raises(ValueError, match=rf"{cls}\({field}="):
        options(**{field: value})
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(options(), field, value)
    (flat,) = [name for name, (c, f) in FLAT_OPTIONS.items() if c is options and f == field]
    with pytest.raises(ValueError, match=rf"SMDCallback\({flat}="):
        SMDCallback(**{flat: value})
