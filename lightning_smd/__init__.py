"""lightning_smd: Spherical Motion Dynamics for PyTorch Lightning and any PyTorch loop.

``SMDCallback`` measures, per scale-invariant tensor, the angular update Δ_t of every measured
optimizer step and its theoretical value Δ*, the weight norm and its predicted equilibrium, and
can rescale the weights at learning-rate drops so the new equilibrium holds at once.
``lightning_smd.theory`` holds the formulas as pure functions.

Layout: ``lightning_smd.core`` (torch only: detection, measurement, theory, estimates,
equilibrium, rescale, plan), ``lightning_smd.lightning`` (the Lightning adapter) and
``lightning_smd.report`` (series, figures, tables, ``python -m lightning_smd.report``).
"""

import sys
from typing import TYPE_CHECKING, Any

from lightning_smd.core import theory

if TYPE_CHECKING:
    from lightning_smd.core.options import DetectionOptions, EquilibriumOptions, EstimateOptions
    from lightning_smd.core.rescale import RescalePolicy
    from lightning_smd.core.detect import find_scale_invariant
    from lightning_smd.homogeneous.callback import HomogeneousCallback
    from lightning_smd.lightning.callback import SMDCallback
    from lightning_smd.monitor import SMDMonitor

__all__ = ["DetectionOptions", "EquilibriumOptions", "EstimateOptions", "HomogeneousCallback", "RescalePolicy",
           "SMDCallback", "SMDMonitor", "find_scale_invariant", "theory"]
__version__ = "0.1.0"

# `lightning_smd.theory` is public (the formulas as pure functions, documented in the README): the
# core module itself, also under this name, so `import lightning_smd.theory` works (as os.path does).
sys.modules[f"{__name__}.theory"] = theory


def __getattr__(name: str) -> Any:
    # Lazy so that `lightning_smd.theory` stays importable without Lightning being imported.
    if name == "SMDCallback":
        from lightning_smd.lightning.callback import SMDCallback

        return SMDCallback
    if name == "SMDMonitor":
        from lightning_smd.monitor import SMDMonitor

        return SMDMonitor
    if name == "HomogeneousCallback":
        from lightning_smd.homogeneous.callback import HomogeneousCallback

        return HomogeneousCallback
    if name in ("DetectionOptions", "EquilibriumOptions", "EstimateOptions"):
        from lightning_smd.core import options

        return getattr(options, name)
    if name == "RescalePolicy":
        from lightning_smd.core.rescale import RescalePolicy

        return RescalePolicy
    if name == "find_scale_invariant":
        from lightning_smd.core.detect import find_scale_invariant

        return find_scale_invariant
    raise AttributeError(f"module 'lightning_smd' has no attribute {name!r}")
