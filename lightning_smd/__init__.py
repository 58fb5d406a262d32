"""lightning_smd: Spherical Motion Dynamics for PyTorch Lightning and any PyTorch loop.

``SMDCallback`` measures, per scale-invariant tensor, the angular update Δ_t of every measured
optimizer step and its theoretical value Δ*, the weight norm and its predicted equilibrium, and
can rescale the weights at learning-rate drops so the new equilibrium holds at once.
``lightning_smd.theory`` holds the formulas as pure functions.

Layout: ``lightning_smd.core`` (torch only: detection, measurement, theory, estimates,
equilibrium, rescale, plan), ``lightning_smd.lightning`` (the Lightning adapter) and
``lightning_smd.report`` (series, figures, tables, ``python -m lightning_smd.report``).
"""

import importlib
import importlib.abc
import importlib.util
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

# Modules that moved into core/, lightning/ and report/: the old names stay importable (the same
# module objects), so `import lightning_smd.theory` and code written against the flat layout work.
_MOVED = {
    **{name: f"core.{name}" for name in (
        "detect", "plan", "measure", "steps", "units", "theory", "estimates", "equilibrium", "rescale", "channels",
        "detection_session", "distributed", "metrics", "schedule", "tracking")},
    **{name: f"lightning.{name}" for name in ("callback", "arguments", "publish")},
    **{name: f"report.{name}" for name in ("series", "channel_figures", "history", "summary", "wandb_extras")},
}


def _new_name(fullname: str) -> str | None:
    head, _, rest = fullname.partition(".")
    if head != __name__ or not rest:
        return None
    first, _, tail = rest.partition(".")
    moved = _MOVED.get(first)
    if moved is None:
        return None
    return f"{__name__}.{moved}" + (f".{tail}" if tail else "")


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module name to the module at its new place (no second copy is made)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        new = _new_name(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        module = importlib.import_module(_new_name(spec.name))  # type: ignore[arg-type]
        self._spec = module.__spec__
        return module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = self._spec  # the import machinery set the alias spec; keep the real one


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


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
