"""Classification of modules and torch calls: normalizations, plain conv/linear producers, casts, reshapes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

_LINEAR_IN_WEIGHT = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_PLAIN_FORWARDS = frozenset(cls.forward for cls in _LINEAR_IN_WEIGHT)
_NORM_MODULES = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
NORM_FUNCS = frozenset({"batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"})

# Calls that read values out of a tensor: data-dependent use even though no tensor comes back.
DATA_READS = frozenset(
    {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__",
     "__array__", "__reduce_ex__", "__deepcopy__"}
)
# Calls that return a tensor built from metadata only.
FROM_METADATA = frozenset(
    {"new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like",
     "full_like", "rand_like", "randn_like", "randint_like"}
)
# Calls that move values around without mixing them: a uniform scale passes through.
CASTS = frozenset({"to", "float", "half", "bfloat16", "double", "contiguous", "clone", "type"})
RESHAPES = frozenset(
    {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "movedim", "squeeze",
     "unsqueeze", "T", "mT"}
)


def is_norm_module(module: nn.Module) -> bool:
    return isinstance(module, _NORM_MODULES)


def _normalizes_with_own_stats(module: nn.Module) -> bool:
    """Whether a norm module normalizes with statistics of its input (not running stats)."""
    if isinstance(module, _BatchNorm):
        return module.training or (module.running_mean is None and module.running_var is None)
    if isinstance(module, _InstanceNorm):
        return module.training or not module.track_running_stats
    return isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm))


def is_normalizing(module: nn.Module | None) -> bool:
    return module is not None and is_norm_module(module) and _normalizes_with_own_stats(module)


def per_channel_module(module: nn.Module) -> bool:
    """Whether a norm module removes a per-channel (dim 1) constant, e.g. a conv bias."""
    if isinstance(module, (_BatchNorm, _InstanceNorm)):
        return True
    return isinstance(module, nn.GroupNorm) and module.num_groups == module.num_channels


def owns_weights(module: nn.Module) -> bool:
    has_direct = next(module.parameters(recurse=False), None) is not None
    return (has_direct or parametrize.is_parametrized(module)) and not is_norm_module(module)


def is_linear_in_weight(module: nn.Module) -> bool:
    """Plain conv/linear: output is linear in ``weight``, so scaling it scales the output."""
    return (
        type(module).forward in _PLAIN_FORWARDS
        and isinstance(module._parameters.get("weight"), nn.Parameter)
        and not parametrize.is_parametrized(module)
    )


def is_leaf(module: nn.Module) -> bool:
    return set(module._modules) <= {"parametrizations"}


def is_channel_first(module: nn.Module, output: Tensor) -> bool:
    """Whether the producer's output channels (where its bias lives) are on dim 1."""
    if isinstance(module, nn.Linear):
        return output.ndim == 2
    kernel = getattr(module, "kernel_size", None)
    return kernel is not None and output.ndim == len(kernel) + 2


def call_arg(args: Sequence[Any], kwargs: dict[str, Any], pos: int, key: str, default: Any) -> Any:
    if len(args) > pos:
        return args[pos]
    return kwargs.get(key, default)


def func_name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # property access, e.g. Tensor.shape.__get__
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name

