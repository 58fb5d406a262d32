"""``lightning_smd.core`` is torch only (every module of it imports with Lightning made unimportable), and
``SMDMonitor`` runs without Lightning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib, pkgutil, sys
for name in ("pytorch_lightning", "lightning", "lightning_fabric", "lightning_utilities"):
    sys.modules[name] = None  # `import name` now raises ImportError
import lightning_smd.core as core
names = [m.name for m in pkgutil.walk_packages(core.__path__, "lightning_smd.core.")]
for name in names:
    importlib.import_module(name)
import lightning_smd.theory
from lightning_smd import theory
assert theory is importlib.import_module("lightning_smd.core.theory")
print(len(names))

import torch
from torch import nn
from lightning_smd import SMDMonitor

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
drop = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[8], gamma=0.1)
import warnings
warnings.simplefilter("ignore")  # the rescale away from equilibrium warns
monitor = SMDMonitor(model, opt, log_every_n_steps=1, rescale=True, verbose=False)
logged = {}
for step in range(10):
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step(); opt.zero_grad(); drop.step()
    logged.update(monitor.pop_metrics())
state = monitor.state_dict()
monitor.close()
assert list(monitor.candidates) == ["0.weight"], monitor.candidates
assert sorted(logged) == list(range(4, 10)), sorted(logged)  # detection over the first steps, then every step
assert logged[9]["smd/angular_update/0.weight"] > 0 and "smd/angular_update_theory/0.weight" in logged[9]
assert abs(logged[8]["smd/rescale_factor"] - 0.1 ** 0.25) < 1e-6, logged[8]
assert [e["step"] for e in monitor.rescale_events] == [8], monitor.rescale_events
resumed = SMDMonitor(model, opt, log_every_n_steps=1, rescale=True, verbose=False)
resumed.load_state_dict(state)
resumed.close()
try:
    SMDMonitor(model, opt, rescale=1)
except ValueError as err:
    assert "SMDMonitor(rescale=" in str(err), err
else:
    raise AssertionError("rescale=1 passed")
print("monitor ok")
"""


def test_core_imports_without_lightning():
    """Every module of ``lightning_smd.core`` imports, and ``SMDMonitor`` runs (a few steps, an LR drop
    rescaled, a resume, its errors naming ``SMDMonitor``), with every Lightning package unimportable."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, monitor = out.stdout.split()[:2]
    assert int(count) >= 15  # detect/*, plan/*, measure, steps, units, theory, ...
    assert monitor == "monitor"


def test_public_names_and_no_alias_hook():
    """The package exports its public names explicitly; the flat module names of the old layout are
    gone (no import hook), and ``lightning_smd.theory`` is the core module under its public name."""
    import importlib

    import pytest

    import lightning_smd
    import lightning_smd.theory
    from lightning_smd.core import theory

    assert lightning_smd.theory is theory and sys.modules["lightning_smd.theory"] is theory
    assert not [f for f in sys.meta_path if type(f).__module__.startswith("lightning_smd")]
    for name in lightning_smd.__all__:
        assert getattr(lightning_smd, name) is not None, name
    for old in ("measure", "callback", "series", "detect"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"lightning_smd.{old}")
    with pytest.raises(AttributeError):
        lightning_smd.measure  # noqa: B018
