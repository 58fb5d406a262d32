"""``lightning_smd.core`` is torch only: every module of it imports with Lightning made unimportable."""

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
"""


def test_core_imports_without_lightning():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 15  # detect/*, plan/*, measure, steps, units, theory, ...
