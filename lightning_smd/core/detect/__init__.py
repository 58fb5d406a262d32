"""Which parameter tensors are scale-invariant (``L(c·w) = L(w)`` for ``c > 0``), and why.

Two independent sources of evidence:

* **structural** — :class:`DataflowRecorder` records the dataflow of one real forward pass
  (module hooks plus a :class:`~torch.overrides.TorchFunctionMode`, so it works on models
  ``torch.fx`` cannot trace, such as torchvision's Mask R-CNN). A conv/linear weight is
  invariant when its module's output goes *only* into a normalization that uses the
  statistics of the batch or instance (BatchNorm in train mode, GroupNorm, LayerNorm,
  InstanceNorm, RMSNorm). Leaf modules that normalize their own weight (weight
  standardization, weight normalization, a functional ``w/‖w‖``) are found by re-running
  them with the parameter doubled.
* **numerical** — :class:`RadialCosineCheck` measures the radial cosine
  ``|⟨g, w⟩| / (‖g‖·‖w‖)``, which is ~1e-7 for invariant tensors (Euler: ``⟨∇L(w), w⟩ = 0``).

Modules: ``candidate`` (the result record, name cleaning), ``modules`` (which modules and torch
calls are normalizations, producers, casts), ``sandbox`` (side-effect-free forward passes),
``structure`` (dataflow recorder and structural rules), ``numerics`` (radial cosines),
``decision`` (combining the evidence, name filters), ``api`` (:func:`find_scale_invariant`).
"""

from __future__ import annotations

from lightning_smd.core.detect.api import DetectionNotes, detection_notes, find_scale_invariant, notes_from_recorder
from lightning_smd.core.detect.candidate import Candidate, clean_name
from lightning_smd.core.detect.decision import DETECT_MODES, decide, normalization_parameters, select
from lightning_smd.core.detect.modules import is_norm_module
from lightning_smd.core.detect.numerics import (
    RadialCosineCheck,
    projection_loss,
    radial_cosines,
    confirm_scale_invariance,
    discovery_threshold,
    precision_floor,
)
from lightning_smd.core.detect.structure import DataflowRecorder, structural_candidates

# Private helpers that lived in the single-file ``detect.py``, still importable from here.
from lightning_smd.core.detect.candidate import _WRAPPER_SEGMENTS  # noqa: F401
from lightning_smd.core.detect.decision import _matcher  # noqa: F401
from lightning_smd.core.detect.modules import (  # noqa: F401
    CASTS as _CASTS,
    DATA_READS as _DATA_READS,
    FROM_METADATA as _FROM_METADATA,
    _LINEAR_IN_WEIGHT,
    NORM_FUNCS as _NORM_FUNCS,
    _NORM_MODULES,
    _PLAIN_FORWARDS,
    RESHAPES as _RESHAPES,
    call_arg as _arg,
    is_channel_first as _channel_first,
    func_name as _func_name,
    is_leaf as _is_leaf,
    is_linear_in_weight as _is_linear_in_weight,
    is_normalizing as _is_normalizing,
    _normalizes_with_own_stats,
    owns_weights as _owns_weights,
    per_channel_module as _per_channel_module,
)
from lightning_smd.core.detect.numerics import _local  # noqa: F401
from lightning_smd.core.detect.sandbox import (  # noqa: F401
    _cuda_devices,
    force_eager as _force_eager,
    forked_rng as _fork_rng,
    restore_buffers as _restore_buffers,
    snapshot_buffers as _snapshot_buffers,
)
from lightning_smd.core.detect.structure import (  # noqa: F401
    _bias_cancels,
    _close,
    _Flow,
    _functional_norm,
    _has_tensor,
    _linear_verdict,
    _norm_labels,
    _NormUse,
    _only_norms,
    _positive_multiple,
    _Producer,
    _RecordingMode,
    _rerun,
    _rerun_verdict,
    _self_normalizing_reason,
    _testable_params,
)
__all__ = [
    "DETECT_MODES",
    "Candidate",
    "DataflowRecorder",
    "DetectionNotes",
    "confirm_scale_invariance",
    "detection_notes",
    "discovery_threshold",
    "notes_from_recorder",
    "precision_floor",
    "RadialCosineCheck",
    "clean_name",
    "decide",
    "find_scale_invariant",
    "is_norm_module",
    "normalization_parameters",
    "select",
    "structural_candidates",
]
