"""lightning_smd: Spherical Motion Dynamics for PyTorch Lightning.

``SMDCallback`` measures, per scale-invariant tensor, the angular update Δ_t of every measured
optimizer step and its theoretical value Δ*, the weight norm and its predicted equilibrium, and
can rescale the weights at learning-rate drops so the new equilibrium holds at once.
``lightning_smd.theory`` holds the formulas as pure functions.
"""

from typing import TYPE_CHECKING, Any

from lightning_smd import theory

if TYPE_CHECKING:
    from lightning_smd.callback import SMDCallback
    from lightning_smd.detect import find_scale_invariant

__all__ = ["SMDCallback", "find_scale_invariant", "theory"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy so that `lightning_smd.theory` stays importable without Lightning being imported.
    if name == "SMDCallback":
        from lightning_smd.callback import SMDCallback

        return SMDCallback
    if name == "find_scale_invariant":
        from lightning_smd.detect import find_scale_invariant

        return find_scale_invariant
    raise AttributeError(f"module 'lightning_smd' has no attribute {name!r}")
