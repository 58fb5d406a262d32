"""Structural detection: record the dataflow of one forward pass and apply the structural rules to it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lightning_smd.detect.candidate import Candidate, clean_name
from lightning_smd.detect.modules import (
    _CASTS,
    _DATA_READS,
    _FROM_METADATA,
    _NORM_FUNCS,
    _RESHAPES,
    _arg,
    _channel_first,
    _func_name,
    _is_leaf,
    _is_linear_in_weight,
    _is_normalizing,
    _owns_weights,
    _per_channel_module,
)
from lightning_smd.detect.sandbox import _force_eager, _fork_rng, _restore_buffers, _snapshot_buffers

__all__ = ["DataflowRecorder", "structural_candidates"]


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

