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
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "Candidate",
    "DataflowRecorder",
    "RadialCosineCheck",
    "clean_name",
    "decide",
    "find_scale_invariant",
    "is_norm_module",
    "normalization_parameters",
    "select",
    "structural_candidates",
]

DETECT_MODES = ("auto", "structural", "numerical")

_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


@dataclass(frozen=True)
class Candidate:
    """A scale-invariant parameter tensor.

    Attributes:
        name: parameter name, normalized with :func:`clean_name`.
        reason: human-readable evidence, e.g. ``"Conv2d → BatchNorm2d (layer1.0.bn1)"``.
        source: ``"structural"`` or ``"numerical"``.
    """

    name: str
    reason: str
    source: str


def clean_name(name: str) -> str:
    """Strip the name segments added by wrappers: ``torch.compile`` (``_orig_mod``), FSDP
    (``_fsdp_wrapped_module``) and activation checkpointing (``_checkpoint_wrapped_module``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


# --------------------------------------------------------------------------------------------
# Module classification
# --------------------------------------------------------------------------------------------

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
_NORM_FUNCS = frozenset({"batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"})

# Calls that read values out of a tensor: data-dependent use even though no tensor comes back.
_DATA_READS = frozenset(
    {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__",
     "__array__", "__reduce_ex__", "__deepcopy__"}
)
# Calls that return a tensor built from metadata only.
_FROM_METADATA = frozenset(
    {"new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like",
     "full_like", "rand_like", "randn_like", "randint_like"}
)
# Calls that move values around without mixing them: a uniform scale passes through.
_CASTS = frozenset({"to", "float", "half", "bfloat16", "double", "contiguous", "clone", "type"})
_RESHAPES = frozenset(
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


def _is_normalizing(module: nn.Module | None) -> bool:
    return module is not None and is_norm_module(module) and _normalizes_with_own_stats(module)


def _per_channel_module(module: nn.Module) -> bool:
    """Whether a norm module removes a per-channel (dim 1) constant, e.g. a conv bias."""
    if isinstance(module, (_BatchNorm, _InstanceNorm)):
        return True
    return isinstance(module, nn.GroupNorm) and module.num_groups == module.num_channels


def _owns_weights(module: nn.Module) -> bool:
    has_direct = next(module.parameters(recurse=False), None) is not None
    return (has_direct or parametrize.is_parametrized(module)) and not is_norm_module(module)


def _is_linear_in_weight(module: nn.Module) -> bool:
    """Plain conv/linear: output is linear in ``weight``, so scaling it scales the output."""
    return (
        type(module).forward in _PLAIN_FORWARDS
        and isinstance(module._parameters.get("weight"), nn.Parameter)
        and not parametrize.is_parametrized(module)
    )


def _is_leaf(module: nn.Module) -> bool:
    return set(module._modules) <= {"parametrizations"}


def _channel_first(module: nn.Module, output: Tensor) -> bool:
    """Whether the producer's output channels (where its bias lives) are on dim 1."""
    if isinstance(module, nn.Linear):
        return output.ndim == 2
    kernel = getattr(module, "kernel_size", None)
    return kernel is not None and output.ndim == len(kernel) + 2


def _arg(args: Sequence[Any], kwargs: dict[str, Any], pos: int, key: str, default: Any) -> Any:
    if len(args) > pos:
        return args[pos]
    return kwargs.get(key, default)


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # property access, e.g. Tensor.shape.__get__
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


# --------------------------------------------------------------------------------------------
# Structural detection: dataflow of one forward pass
# --------------------------------------------------------------------------------------------


@dataclass
class _NormUse:
    label: str
    per_channel: bool


@dataclass
class _Flow:
    """One output tensor of a weight-owning module and everything that consumed it."""

    channel_first: bool
    reshaped: bool = False
    norms: list[_NormUse] = field(default_factory=list)
    others: list[str] = field(default_factory=list)


@dataclass
class _Producer:
    module: nn.Module
    name: str
    flows: list[_Flow] = field(default_factory=list)
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None


class _RecordingMode(TorchFunctionMode):
    def __init__(self, recorder: DataflowRecorder) -> None:
        super().__init__()
        self._recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._recorder._on_call(func, args, kwargs, out)
        return out


class DataflowRecorder:
    """Records the dataflow of ONE forward pass of ``module`` and returns structural candidates.

    ``module`` may be wrapped (DDP, ``torch.compile``, ...): hooks go on all its submodules and
    names are taken relative to it, cleaned with :func:`clean_name`. Compiled code runs eagerly
    while recording. Call :meth:`start`, run the forward pass, then :meth:`stop` in the same
    thread (torch function modes are thread-local). Also a context manager; after
    ``__exit__`` the result is in :attr:`candidates`.

    A conv/linear weight is a candidate when every output of its module is consumed only by a
    normalization using batch/instance statistics, and its bias is ``None`` or removed by that
    normalization (BatchNorm/InstanceNorm, GroupNorm with one channel per group). Leaf modules
    with other forwards are re-run with each parameter doubled: unchanged output means the
    module normalizes the parameter itself; a uniformly scaled output that only feeds
    normalizations is invariant too.
    """

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self._handles: list[Any] = []
        self._mode: _RecordingMode | None = None
        self._stance: Any = None
        self._stack: list[nn.Module] = []
        self._names: dict[int, str] = {}
        self._producers: dict[int, _Producer] = {}
        self._tracked: dict[int, tuple[Tensor, _Flow]] = {}
        self.candidates: dict[str, Candidate] | None = None

    def __enter__(self) -> DataflowRecorder:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Install the hooks and the torch function mode."""
        if self._mode is not None or self._handles:
            raise RuntimeError("DataflowRecorder.start() called twice")
        self.candidates = None
        for name, sub in self._module.named_modules():
            self._names[id(sub)] = clean_name(name) or "<root>"
            if _owns_weights(sub):
                self._producers[id(sub)] = _Producer(sub, clean_name(name))
            self._handles.append(sub.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._handles.append(
                sub.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True)
            )
        self._stance = _force_eager()
        self._mode = _RecordingMode(self)
        self._mode.__enter__()

    def stop(self) -> dict[str, Candidate]:
        """Remove everything that :meth:`start` installed and return the candidates, keyed by
        clean parameter name. Idempotent; safe after an exception in the forward pass."""
        if self.candidates is not None:
            return self.candidates
        self._remove_instrumentation()
        try:
            self.candidates = self._evaluate()
        finally:
            if self._stance is not None:
                self._stance.__exit__(None, None, None)
                self._stance = None
            self._tracked.clear()
            self._producers.clear()
            self._stack.clear()
        return self.candidates

    # -- recording --------------------------------------------------------------------------

    def _remove_instrumentation(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def _flow_of(self, value: Any) -> _Flow | None:
        entry = self._tracked.get(id(value)) if isinstance(value, Tensor) else None
        return entry[1] if entry is not None and entry[0] is value else None

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._stack.append(module)
        if _is_normalizing(module) and args:
            flow = self._flow_of(args[0])
            if flow is not None:
                label = f"{type(module).__name__} ({self._names.get(id(module), '?')})"
                flow.norms.append(_NormUse(label, _per_channel_module(module)))
        producer = self._producers.get(id(module))
        if producer is not None and producer.inputs is None and not _is_linear_in_weight(module):
            producer.inputs = (args, kwargs)

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if module in self._stack:
            del self._stack[len(self._stack) - 1 - self._stack[::-1].index(module)]
        producer = self._producers.get(id(module))
        if producer is None or not isinstance(output, Tensor) or id(output) in self._tracked:
            return
        flow = _Flow(channel_first=_channel_first(module, output))
        producer.flows.append(flow)
        self._tracked[id(output)] = (output, flow)  # strong ref: ids stay unique in the pass

    def _on_call(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if not self._tracked:
            return
        flat, _ = tree_flatten((args, kwargs))
        uses = [(t, flow) for t in flat if (flow := self._flow_of(t)) is not None]
        if not uses:
            return
        name = _func_name(func)
        if name not in _DATA_READS and (name in _FROM_METADATA or not _has_tensor(out)):
            return  # metadata only: shape, dtype, dim(), size(), ...
        consumer = self._stack[-1] if self._stack else None
        if _is_normalizing(consumer):
            return  # inside a normalization module: its input use was recorded by _pre_hook
        where = self._names.get(id(consumer), "<root>") if consumer is not None else "<root>"
        for tensor, flow in uses:
            self._record_use(name, args, kwargs, out, tensor, flow, where, len(uses))

    def _record_use(self, name, args, kwargs, out, tensor, flow, where, n_uses) -> None:
        norm = _functional_norm(name, args, kwargs, tensor)
        if norm is not None:
            flow.norms.append(_NormUse(f"F.{name} (in {where})", norm))
        elif out is tensor and not name.endswith("_") and not name.startswith("__i"):
            pass  # returned its input unchanged (e.g. .contiguous() of a contiguous tensor)
        elif (name in _CASTS or name in _RESHAPES) and isinstance(out, Tensor) and n_uses == 1:
            flow.reshaped |= name in _RESHAPES
            self._tracked[id(out)] = (out, flow)
        else:
            flow.others.append(f"{name} (in {where})")

    # -- evaluation -------------------------------------------------------------------------

    def _evaluate(self) -> dict[str, Candidate]:
        param_names = {id(p): clean_name(n) for n, p in self._module.named_parameters()}
        verdicts: dict[str, list[Candidate | None]] = {}
        for producer in self._producers.values():
            for param, verdict in self._judge(producer):
                name = param_names.get(id(param))
                if name is not None:
                    verdicts.setdefault(name, []).append(verdict)
        # A shared tensor is invariant only if every module using it says so.
        return {
            name: found[0]
            for name, found in verdicts.items()
            if all(v is not None for v in found)
        }

    def _judge(self, producer: _Producer) -> list[tuple[nn.Parameter, Candidate | None]]:
        module = producer.module
        if _is_linear_in_weight(module):
            if not producer.flows:
                return []
            return [(module.weight, _linear_verdict(producer))]
        if producer.inputs is None or not _is_leaf(module):
            return []
        feeds_norms = bool(producer.flows) and all(_only_norms(f) for f in producer.flows)
        return [
            (param, _rerun_verdict(producer, local, param, feeds_norms))
            for local, param in _testable_params(module)
        ]


def _has_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (tuple, list, dict)):
        return any(isinstance(v, Tensor) for v in tree_flatten(value)[0])
    return False


def _functional_norm(name: str, args: tuple, kwargs: dict, tensor: Tensor) -> bool | None:
    """For a normalizing call on ``tensor`` return whether it removes per-channel constants;
    ``None`` when the call is not a normalization with the input's own statistics."""
    if name not in _NORM_FUNCS or _arg(args, kwargs, 0, "input", None) is not tensor:
        return None
    if name == "batch_norm":
        return True if _arg(args, kwargs, 5, "training", False) else None
    if name == "instance_norm":
        return True if _arg(args, kwargs, 5, "use_input_stats", True) else None
    if name == "group_norm":
        groups = _arg(args, kwargs, 1, "num_groups", None)
        return tensor.ndim >= 2 and groups == tensor.shape[1]
    return False  # layer_norm, rms_norm: no per-channel centring


def _only_norms(flow: _Flow) -> bool:
    return bool(flow.norms) and not flow.others


def _bias_cancels(flow: _Flow, has_bias: bool) -> bool:
    if not has_bias:
        return True
    per_channel = flow.channel_first and not flow.reshaped
    return per_channel and all(use.per_channel for use in flow.norms)


def _norm_labels(producer: _Producer) -> str:
    labels = dict.fromkeys(use.label for flow in producer.flows for use in flow.norms)
    return ", ".join(labels)


def _linear_verdict(producer: _Producer) -> Candidate | None:
    module = producer.module
    has_bias = getattr(module, "bias", None) is not None
    if not all(_only_norms(f) and _bias_cancels(f, has_bias) for f in producer.flows):
        return None
    reason = f"{type(module).__name__} → {_norm_labels(producer)}"
    return Candidate(f"{producer.name}.weight".lstrip("."), reason, "structural")


def _testable_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = list(module.named_parameters(recurse=False))
    if parametrize.is_parametrized(module):
        params += [
            (f"parametrizations.{n}", p)
            for n, p in module.parametrizations.named_parameters()
        ]
    return params


def _rerun_verdict(
    producer: _Producer, local: str, param: nn.Parameter, feeds_norms: bool
) -> Candidate | None:
    outputs = _rerun(producer.module, producer.inputs, local, param)
    if outputs is None:
        return None
    base, doubled, perturbed = outputs
    name = f"{producer.name}.{local}".lstrip(".")
    if _close(doubled, base) and not _close(perturbed, base):
        return Candidate(name, _self_normalizing_reason(producer, local), "structural")
    if feeds_norms and _positive_multiple(doubled, base) and not _close(perturbed, base):
        reason = (
            f"{type(producer.module).__name__} output scales uniformly → {_norm_labels(producer)}"
        )
        return Candidate(name, reason, "structural")
    return None


def _self_normalizing_reason(producer: _Producer, local: str) -> str:
    module = producer.module
    if local.endswith("weight_v"):
        return "weight_norm direction"
    if local.endswith(".original1") and parametrize.is_parametrized(module):
        tensor_name = local.split(".")[1]
        chain = module.parametrizations[tensor_name]
        if any(isinstance(p, nn.utils.parametrizations._WeightNorm) for p in chain):
            return "weight_norm direction"
    where = f"{type(module).__name__} {producer.name or '<root>'}"
    return f"self-normalizing: output unchanged when scaled ({where})"


def _rerun(
    module: nn.Module, inputs: tuple[tuple, dict], local: str, param: nn.Parameter
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Outputs of ``module`` on its recorded inputs with ``param`` as is, doubled, and
    perturbed in a random non-radial direction. The parameter is swapped in with
    ``functional_call`` (never written to, so an autograd graph that saved it stays valid);
    buffers are restored."""
    args, kwargs = inputs
    buffers = _snapshot_buffers(module)
    outputs = []
    try:
        with torch.no_grad():
            original = param.detach()
            if float(original.float().norm()) == 0.0:
                return None  # scaling zero changes nothing, and proves nothing
            noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(0))
            for value in (original, 2.0 * original, original * (1.0 + 0.5 * noise.to(original))):
                with _fork_rng(module):
                    torch.manual_seed(0)
                    outputs.append(torch.func.functional_call(module, {local: value}, args, kwargs))
                _restore_buffers(buffers)
    except Exception:  # a module that cannot be re-run in isolation: no verdict
        return None
    finally:
        _restore_buffers(buffers)
    if not all(isinstance(o, Tensor) and o.is_floating_point() for o in outputs):
        return None
    return tuple(o.detach().float() for o in outputs)  # type: ignore[return-value]


def _close(a: Tensor, b: Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    if a.shape != b.shape or scale == 0.0 or not math.isfinite(scale):
        return False
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


def _positive_multiple(a: Tensor, b: Tensor) -> bool:
    """Whether ``a ≈ k·b`` for one scalar ``k > 0``."""
    if a.shape != b.shape:
        return False
    denom = float((b * b).sum())
    if denom == 0.0:
        return False
    k = float((a * b).sum()) / denom
    return k > 0 and _close(a, k * b)


# --------------------------------------------------------------------------------------------
# Side-effect-free forward pass
# --------------------------------------------------------------------------------------------


def _force_eager() -> Any:
    """Run ``torch.compile``d code eagerly while recording (returns the stance to exit)."""
    try:
        return torch.compiler.set_stance("force_eager")
    except Exception:  # older torch or dynamo unavailable
        return None


def _cuda_devices(module: nn.Module) -> list[int]:
    devices = {p.device.index for p in module.parameters() if p.device.type == "cuda"}
    return sorted(d for d in devices if d is not None)


def _fork_rng(module: nn.Module):
    return torch.random.fork_rng(devices=_cuda_devices(module))


def _snapshot_buffers(module: nn.Module) -> list[tuple[nn.Module, str, Tensor, Tensor]]:
    saved = []
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and not nn.parameter.is_lazy(buf):
                saved.append((sub, name, buf, buf.detach().clone()))
    return saved


def _restore_buffers(saved: list[tuple[nn.Module, str, Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for sub, name, buf, value in saved:
            sub._buffers[name] = buf
            buf.copy_(value)


def structural_candidates(module: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Candidate]:
    """Structural candidates from ONE forward ``module(*args, **kwargs)``.

    The pass runs in train mode (BatchNorm normalizes with batch statistics there) under
    ``torch.no_grad()``. Train/eval modes, buffers (BN running statistics,
    ``num_batches_tracked``) and the RNG state are restored afterwards.
    """
    modes = [(m, m.training) for m in module.modules()]
    buffers = _snapshot_buffers(module)
    try:
        with torch.no_grad(), _fork_rng(module):
            module.train()
            with DataflowRecorder(module) as recorder:
                module(*args, **kwargs)
    finally:
        for sub, training in modes:
            sub.training = training
        _restore_buffers(buffers)
    return recorder.candidates or {}


# --------------------------------------------------------------------------------------------
# Numerical detection
# --------------------------------------------------------------------------------------------


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class RadialCosineCheck:
    """Per-tensor maximum of the radial cosine ``|⟨g, w⟩| / (‖g‖·‖w‖)`` over the updates seen.

    :meth:`update` reads ``p.grad``; it does no host synchronization, so it can run in every
    ``on_before_optimizer_step`` of the detection window. Tensors with zero norm or without
    (or with a zero) gradient are not counted for that update. For sharded tensors (DTensor,
    FSDP shards) pass ``reduce_fn``: it receives the per-shard partial sums stacked as a
    ``[3, N]`` tensor (``⟨w, g⟩``, ``‖w‖²``, ``‖g‖²``) and must return their global sums (e.g. an
    all-reduce); it is called once per update and device that has gradients.
    """

    def __init__(
        self,
        named_params: list[tuple[str, Tensor]],
        reduce_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self._names = [name for name, _ in named_params]
        self._params = [param for _, param in named_params]
        self._reduce_fn = reduce_fn
        self._max: dict[torch.device, Tensor] = {}
        self._index: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}
        self._steps = 0

    @property
    def steps(self) -> int:
        """Number of :meth:`update` calls so far."""
        return self._steps

    def update(self) -> None:
        """Accumulate the radial cosines of the current gradients, on device."""
        groups: dict[torch.device, list[int]] = {}
        for i, param in enumerate(self._params):
            if param.grad is not None:
                groups.setdefault(_local(param).device, []).append(i)
        for device, indices in groups.items():
            self._update_group(device, indices)
        self._steps += 1

    def _update_group(self, device: torch.device, indices: list[int]) -> None:
        weights = [_local(self._params[i]).detach().reshape(-1) for i in indices]
        grads = [_local(self._params[i].grad).reshape(-1) for i in indices]
        dots = torch.stack([torch.dot(w.float(), g.float()) for w, g in zip(weights, grads)])
        w_sq = torch.stack(torch._foreach_norm(weights, 2, dtype=torch.float32)).square()
        g_sq = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square()
        sums = torch.stack([dots, w_sq, g_sq])
        if self._reduce_fn is not None:
            sums = self._reduce_fn(sums)
        dot, w_sq, g_sq = sums.unbind(0)
        cosine = dot.abs() / (w_sq.sqrt() * g_sq.sqrt())
        cosine = torch.where((w_sq > 0) & (g_sq > 0), cosine, torch.nan)
        if device not in self._max:
            self._max[device] = torch.full((len(self._params),), torch.nan, device=device)
        index = self._index_tensor(device, indices)
        running = self._max[device]
        running[index] = torch.fmax(running[index], cosine)  # fmax ignores NaN (skipped)

    def _index_tensor(self, device: torch.device, indices: list[int]) -> Tensor:
        key = (device, tuple(indices))
        if key not in self._index:
            self._index[key] = torch.tensor(indices, dtype=torch.long, device=device)
        return self._index[key]

    def result(self) -> dict[str, float]:
        """Maximum radial cosine per name (NaN if never measured); one host transfer."""
        values = [math.nan] * len(self._names)
        for running in self._max.values():
            for i, value in enumerate(running.cpu().tolist()):
                if not math.isnan(value):
                    values[i] = value if math.isnan(values[i]) else max(values[i], value)
        return dict(zip(self._names, values))


def _projection_loss(output: Any) -> Tensor:
    """A scalar from any model output: scalar tensors (losses) are summed, other tensors
    enter through a fixed random projection."""
    leaves = [
        t for t in tree_flatten(output)[0]
        if isinstance(t, Tensor) and t.requires_grad and t.is_floating_point()
    ]
    if not leaves:
        raise ValueError("the module output contains no differentiable floating-point tensor")
    generator = torch.Generator().manual_seed(0)
    total = leaves[0].new_zeros((), dtype=torch.float32)
    for t in leaves:
        if t.ndim == 0:
            total = total + t.float()
        else:
            weights = torch.randn(t.shape, generator=generator).to(t.device)
            total = total + (t.float() * weights).sum()
    return total


def _radial_cosines(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, float]:
    """Radial cosine of every trainable tensor after one backward, on a deep copy."""
    replica = copy.deepcopy(module)
    replica.train()
    with _fork_rng(replica):
        torch.manual_seed(0)
        _projection_loss(replica(*args, **kwargs)).backward()
    check = RadialCosineCheck(
        [(clean_name(n), p) for n, p in replica.named_parameters() if p.requires_grad]
    )
    check.update()
    return check.result()


# --------------------------------------------------------------------------------------------
# Selection and the user-facing helper
# --------------------------------------------------------------------------------------------


def _matcher(pattern: Any, argument: str) -> Callable[[str], bool] | None:
    if pattern is None:
        return None
    if callable(pattern):
        return lambda name: bool(pattern(name))
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(
            f"{argument} must be None, a regex string, a list of regex strings or a callable, "
            f"got {pattern!r}"
        )
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as err:
        raise ValueError(f"invalid regular expression in {argument}: {err}") from err
    return lambda name: any(c.search(name) for c in compiled)


def select(names: Iterable[str], include: Any = None, exclude: Any = None) -> list[str]:
    """Filter ``names``.

    ``include``/``exclude`` are each ``None``, a regex (``re.search``), a list of regexes (any
    matches) or a callable ``name -> bool``. ``include`` keeps only matching names, ``exclude``
    drops matching names. Raises ``ValueError`` naming the argument on an invalid regex or type.
    """
    keep = _matcher(include, "include")
    drop = _matcher(exclude, "exclude")
    return [
        n for n in names if (keep is None or keep(n)) and (drop is None or not drop(n))
    ]


def find_scale_invariant(
    module: nn.Module,
    *args: Any,
    include: Any = None,
    exclude: Any = None,
    detect: str = "auto",
    threshold: float = 1e-4,
    **kwargs: Any,
) -> list[Candidate]:
    """Find the scale-invariant parameter tensors of ``module`` for the input ``*args, **kwargs``.

    Args:
        module: the model; left unchanged (train/eval modes, buffers and RNG are restored; the
            numerical check runs on a deep copy).
        *args, **kwargs: one input batch, passed as ``module(*args, **kwargs)``. BatchNorm
            runs in train mode, so use a batch of at least 2.
        include, exclude: filters on parameter names, see :func:`select`.
        detect: ``"structural"``: dataflow rules only (:func:`structural_candidates`);
            ``"numerical"``: radial cosine below ``threshold`` after one backward of a fixed
            random projection of the outputs (dicts of scalar losses are summed);
            ``"auto"``: structural candidates confirmed numerically (unconfirmed ones are
            dropped with a warning) plus numerically invariant tensors that the structure
            could not explain.
        threshold: radial cosine under which a tensor counts as invariant.

    Returns:
        Candidates in parameter order.

    Note:
        Numerical discoveries measured at initialisation can be false positives: e.g. a
        BatchNorm γ whose β is still zero feeds a ReLU and then another normalization, which
        makes it invariant *until β moves*. Normalization layers' own parameters are therefore
        never discovered numerically (see :func:`decide`), and ``SMDCallback`` runs its
        numerical check over several steps after the first optimizer update.
    """
    if detect not in DETECT_MODES:
        allowed = ", ".join(map(repr, DETECT_MODES))
        raise ValueError(f"detect must be one of {allowed}, got {detect!r}")
    structural = structural_candidates(module, *args, **kwargs) if detect != "numerical" else {}
    cosines = _radial_cosines(module, args, kwargs) if detect != "structural" else {}
    found, rejected = decide(structural, cosines, detect, threshold, normalization_parameters(module))
    if rejected:
        warnings.warn(
            "structural scale-invariance candidates not confirmed numerically, dropped: "
            + "; ".join(f"{n}: {why}" for n, why in rejected.items()),
            stacklevel=2,
        )
    order = [clean_name(n) for n, _ in module.named_parameters()]
    names = select([n for n in order if n in found], include, exclude)
    return [found[n] for n in names]


def normalization_parameters(module: nn.Module) -> set[str]:
    """Clean names of the normalization layers' own parameters (γ, β) inside ``module``."""
    return {
        clean_name(f"{prefix}.{name}" if prefix else name)
        for prefix, sub in module.named_modules()
        if is_norm_module(sub)
        for name, _ in sub.named_parameters(recurse=False)
    }


def decide(
    structural: dict[str, Candidate],
    cosines: dict[str, float],
    detect: str,
    threshold: float,
    never_numerical: Iterable[str] = (),
    confirm_threshold: float | None = None,
) -> tuple[dict[str, Candidate], dict[str, str]]:
    """Combine the two kinds of evidence; returns ``(chosen, rejected)`` (rejected: name → why).

    * ``"structural"``: the structural candidates.
    * ``"numerical"``: tensors whose radial cosine is below ``threshold``.
    * ``"auto"``: structural candidates the radial cosine does not contradict (unmeasured ones,
      e.g. without a gradient, are kept), plus numerically invariant tensors structure missed.

    ``never_numerical`` (normally :func:`normalization_parameters`) is never *discovered*
    numerically: a norm layer's γ whose β is still ≈0, followed by ReLU → conv → BN, is
    invariant jointly with β only, yet its radial cosine in the first steps is as small as a
    true invariant's (1e-6 on torchvision ResNets).

    ``confirm_threshold`` (default ``threshold``) is the bar a *structural* candidate must pass:
    16-bit gradients put true invariants at radial cosines of 1e-4 to 1e-3, so the callback
    confirms structure more loosely there while numerical discoveries keep the strict bar.
    """
    if detect not in DETECT_MODES:
        allowed = ", ".join(map(repr, DETECT_MODES))
        raise ValueError(f"detect must be one of {allowed}, got {detect!r}")
    if detect == "structural":
        return dict(structural), {}
    chosen: dict[str, Candidate] = {}
    rejected: dict[str, str] = {}
    confirm = threshold if confirm_threshold is None else confirm_threshold
    if detect == "auto":
        for name, candidate in structural.items():
            cos = cosines.get(name, math.nan)
            if cos >= confirm:
                rejected[name] = f"{candidate.reason}, but radial cosine {cos:.1e} >= {confirm:g}"
            else:
                chosen[name] = candidate
    skip = set(never_numerical) | set(structural)
    for name, cos in cosines.items():
        if name not in skip and cos < threshold:  # NaN (never measured) compares False
            chosen[name] = Candidate(name, f"numerical: radial cosine {cos:.1e}", "numerical")
    return chosen, rejected
