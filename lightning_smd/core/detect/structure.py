"""Structural detection: record the dataflow of one forward pass and apply the structural rules to it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lightning_smd.core.detect.candidate import Candidate, clean_name
from lightning_smd.core.detect.modules import (
    CASTS,
    DATA_READS,
    FROM_METADATA,
    NORM_FUNCS,
    RESHAPES,
    call_arg,
    is_channel_first,
    func_name,
    is_leaf,
    is_linear_in_weight,
    is_normalizing,
    is_norm_module,
    owns_weights,
    per_channel_module,
)
from lightning_smd.core.detect.numerics import generic_values
from lightning_smd.core.detect.sandbox import force_eager, forked_rng, restore_buffers, snapshot_buffers, isolated_call
from lightning_smd.parametrizations import ExpWeightNorm

__all__ = ["DataflowRecorder", "structural_candidates"]


@dataclass
class _NormUse:
    label: str
    per_channel: bool
    module: nn.Module | None = None
    name: str | None = None  # the module's name in the model; None for a functional call
    kind: str = ""  # the label without the name: the module's class, or ``F.<function>``


@dataclass
class _NormInput:
    """Input statistics of one normalization module seen in the pass (for eps-dominance)."""

    label: str
    eps: float
    min_var: Tensor  # smallest variance over its normalization units, on device


@dataclass
class _Flow:
    """One output tensor of a weight-owning module and everything that consumed it."""

    channel_first: bool
    reshaped: bool = False
    norms: list[_NormUse] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    # a normalization's output (its γ/β rule): linear maps it went through, and the ones it is in
    from_norm: bool = False
    through: list[tuple[str, str]] = field(default_factory=list)  # (label with the name, class)
    passing: set[int] = field(default_factory=set)


@dataclass
class _Producer:
    module: nn.Module
    name: str
    flows: list[_Flow] = field(default_factory=list)
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    eps_notes: dict[str, str] = field(default_factory=dict)  # param name → why eps-dominated
    # id(param) → how far from invariant the re-run found it: output move under w → 2w over a random change's
    rerun_defect: dict[int, float] = field(default_factory=dict)


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
        self._tracked: dict[int, tuple[Tensor, list[_Flow]]] = {}
        self._norm_producers: dict[int, _Producer] = {}
        self._passing: dict[int, list[_Flow]] = {}
        self._norm_inputs: dict[int, _NormInput] = {}
        self.dead: dict[str, str] = {}
        self.eps_dominated: dict[str, str] = {}
        self.eps_defect: dict[str, float] = {}  # chosen name → eps/(var+eps) of the norms it feeds (largest)
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
            if owns_weights(sub):
                self._producers[id(sub)] = _Producer(sub, clean_name(name))
            elif _has_affine_weight(sub):
                self._norm_producers[id(sub)] = _Producer(sub, clean_name(name))
            # prepend: see a module's input before other pre-hooks change it (TP's SequenceParallel
            # turns it into a DTensor, hiding which producer it came from)
            self._handles.append(sub.register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=True))
            self._handles.append(
                sub.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True)
            )
        self._stance = force_eager()
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
            self._norm_producers.clear()
            self._passing.clear()
            self._norm_inputs.clear()
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

    def _flows_of(self, value: Any) -> list[_Flow]:
        entry = self._tracked.get(id(value)) if isinstance(value, Tensor) else None
        return entry[1] if entry is not None and entry[0] is value else []

    def _flow_of(self, value: Any) -> _Flow | None:
        flows = self._flows_of(value)
        return flows[0] if flows else None

    def _track(self, tensor: Tensor, flow: _Flow) -> None:
        entry = self._tracked.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            self._tracked[id(tensor)] = (tensor, [flow])  # strong ref: ids stay unique in the pass
        elif flow not in entry[1]:
            entry[1].append(flow)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._stack.append(module)
        flows = self._flows_of(args[0]) if args else []
        if is_normalizing(module) and args:
            if flows:
                module_name = self._names.get(id(module), "?")
                label = f"{type(module).__name__} ({module_name})"
                for flow in flows:
                    flow.norms.append(_NormUse(label, per_channel_module(module), module, module_name,
                                               type(module).__name__))
                self._note_norm_input(module, args[0], label)
        elif flows and _passes_constants(module) and len(args) == 1 and not kwargs:
            for flow in flows:
                if flow.from_norm:
                    flow.passing.add(id(module))
                    self._passing.setdefault(id(module), []).append(flow)
        producer = self._producers.get(id(module))
        if producer is not None and producer.inputs is None and not is_linear_in_weight(module):
            producer.inputs = (args, kwargs)
        norm_producer = self._norm_producers.get(id(module))
        if norm_producer is not None and norm_producer.inputs is None and not _plain_norm(module):
            norm_producer.inputs = (args, kwargs)

    def _note_norm_input(self, module: nn.Module, x: Any, label: str) -> None:
        eps = getattr(module, "eps", None)
        if id(module) in self._norm_inputs or not isinstance(eps, float) or not isinstance(x, Tensor):
            return
        try:
            self._norm_inputs[id(module)] = _NormInput(label, eps, _min_unit_variance(module, x.detach()))
        except Exception:  # unusual layouts: no statistics, no eps verdict
            pass

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if module in self._stack:
            del self._stack[len(self._stack) - 1 - self._stack[::-1].index(module)]
        passing = self._passing.pop(id(module), [])
        producer = self._producers.get(id(module)) or self._norm_producers.get(id(module))
        if producer is not None and isinstance(output, Tensor) and id(output) not in self._tracked:
            from_norm = id(module) in self._norm_producers
            first = _norm_channel_first(module, output) if from_norm else is_channel_first(module, output)
            flow = _Flow(channel_first=first, from_norm=from_norm)
            producer.flows.append(flow)
            self._track(output, flow)
        for flow in passing:  # a norm's output continues through a linear map without padding
            flow.passing.discard(id(module))
            if isinstance(output, Tensor) and is_channel_first(module, output):
                flow.through.append((f"{type(module).__name__} ({self._names.get(id(module), '?')})",
                                     type(module).__name__))
                self._track(output, flow)
            else:
                flow.others.append(f"{type(module).__name__} (in {self._names.get(id(module), '?')})")

    def _on_call(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if not self._tracked:
            return
        flat, _ = tree_flatten((args, kwargs))
        uses = [(t, flow) for t in flat for flow in self._flows_of(t)]
        if not uses:
            return
        name = func_name(func)
        if name not in DATA_READS and (name in FROM_METADATA or not _has_tensor(out)):
            return  # metadata only: shape, dtype, dim(), size(), ...
        consumer = self._stack[-1] if self._stack else None
        if is_normalizing(consumer):
            return  # inside a normalization module: its input use was recorded by _pre_hook
        where = self._names.get(id(consumer), "<root>") if consumer is not None else "<root>"
        n_tensors = len({id(t) for t, _ in uses})
        for tensor, flow in uses:
            if consumer is not None and id(consumer) in flow.passing:
                continue  # inside a linear map the flow passes through: judged at its output
            self._record_use(name, args, kwargs, out, tensor, flow, where, n_tensors)

    def _record_use(self, name, args, kwargs, out, tensor, flow, where, n_uses) -> None:
        norm = _functional_norm(name, args, kwargs, tensor)
        if norm is not None:
            flow.norms.append(_NormUse(f"F.{name} (in {where})", norm, kind=f"F.{name}"))
        elif out is tensor and (name in CASTS or name in RESHAPES or name in _NO_OPS):
            pass  # returned its input unchanged (e.g. .contiguous() of a contiguous tensor);
            # not F.relu(x, inplace=True), which also returns its input, modified
        elif (name in CASTS or name in RESHAPES) and isinstance(out, Tensor) and n_uses == 1:
            flow.reshaped |= name in RESHAPES
            self._track(out, flow)
        else:
            flow.others.append(f"{name} (in {where})")

    # -- evaluation -------------------------------------------------------------------------

    def _evaluate(self) -> dict[str, Candidate]:
        param_names = {id(p): clean_name(n) for n, p in self._module.named_parameters()}
        verdicts: dict[str, list[Candidate | None]] = {}
        judged = [(producer, self._judge(producer)) for producer in self._producers.values()]
        judged += [(producer, _norm_verdicts(producer)) for producer in self._norm_producers.values()]
        for _, found in judged:
            for param, verdict in found:
                name = param_names.get(id(param))
                if name is not None:
                    verdicts.setdefault(name, []).append(verdict)
        # A shared tensor is invariant only if every module using it says so.
        chosen = {
            name: found[0]
            for name, found in verdicts.items()
            if all(v is not None for v in found)
        }
        self.dead = {}
        for producer, _ in judged:
            for param, why in _dead_params(producer):
                name = param_names.get(id(param))
                if name is not None:
                    self.dead[name] = why
        self.eps_dominated = self._eps_dominated(chosen, judged, param_names)
        for producer, _ in judged:
            for name, why in producer.eps_notes.items():
                self.eps_dominated.setdefault(name, why)
            # a self-normalizing module's eps (weight standardization) leaves this much of w's scale
            for key, ratio in producer.rerun_defect.items():
                if (name := param_names.get(key)) in chosen:
                    self.eps_defect[name] = max(self.eps_defect.get(name, 0.0), ratio)
        return chosen

    def _eps_dominated(self, chosen, judged, param_names) -> dict[str, str]:
        """Chosen tensors whose normalization sees an input variance within EPS_MARGIN·eps."""
        stats = list(self._norm_inputs.items())
        if not stats:
            return {}
        ratios = (torch.stack([s.min_var.float().cpu() for _, s in stats]) if stats else None)  # one transfer
        by_module = {key: (s, float(r)) for (key, s), r in zip(stats, ratios.tolist())}
        found: dict[str, str] = {}
        self.eps_defect = {}
        for producer, verdicts in judged:
            for param, verdict in verdicts:
                name = param_names.get(id(param))
                if verdict is None or name not in chosen:
                    continue
                for flow in producer.flows:
                    for use in flow.norms:
                        entry = by_module.get(id(use.module)) if use.module is not None else None
                        if entry is None:
                            continue
                        stat, var = entry
                        defect = stat.eps / (var + stat.eps) if var + stat.eps > 0 else 1.0
                        self.eps_defect[name] = max(self.eps_defect.get(name, 0.0), defect)
                        if var < EPS_MARGIN * stat.eps:
                            found[name] = f"{stat.label}: input variance {var:.2g} vs eps {stat.eps:g}"
        return found

    def _judge(self, producer: _Producer) -> list[tuple[nn.Parameter, Candidate | None]]:
        module = producer.module
        if is_linear_in_weight(module):
            if not producer.flows:
                return []
            return [(module.weight, _linear_verdict(producer))]
        if producer.inputs is None or not is_leaf(module):
            return []
        feeds_norms = bool(producer.flows) and all(_only_norms(f) for f in producer.flows)
        return [
            (param, _rerun_verdict(producer, local, param, feeds_norms))
            for local, param in _testable_params(module)
        ]


RERUN_TOL = 0.1  # output change under w → 2w relative to a random 50 % change of w (≈2 when not invariant)
_NO_OPS = frozenset({"requires_grad_", "retain_grad", "detach_", "share_memory_"})
EPS_MARGIN = 100.0  # a normalization whose smallest input variance is under 100·eps is eps-dominated


def _has_affine_weight(module: nn.Module) -> bool:
    """A normalization module with a per-channel γ on dim 1 (BN, IN, GN; LN/RMSNorm over one dim)."""
    weight = module._parameters.get("weight") if is_norm_module(module) else None
    if not isinstance(weight, nn.Parameter):
        return False
    shape = getattr(module, "normalized_shape", None)
    return shape is None or len(shape) == 1


def _norm_channel_first(module: nn.Module, output: Tensor) -> bool:
    """Whether a norm module's γ/β act on dim 1 of its output."""
    if getattr(module, "normalized_shape", None) is not None:  # LayerNorm / RMSNorm: last dim
        return output.ndim == 2
    return output.ndim >= 2


def _passes_constants(module: nn.Module) -> bool:
    """A plain conv/linear that maps a per-channel constant to a per-channel constant: no
    padding (zero borders would make it vary in space), no transposed conv (overlaps vary)."""
    if not is_linear_in_weight(module) or isinstance(module, nn.modules.conv._ConvTransposeNd):
        return False
    padding = getattr(module, "padding", 0)
    if isinstance(padding, str):
        return padding == "valid" or all(k == 1 for k in module.kernel_size)
    return all(p == 0 for p in (padding if isinstance(padding, tuple) else (padding,)))


def _min_unit_variance(module: nn.Module, x: Tensor) -> Tensor:
    """Smallest biased variance over the units a norm module normalizes (channels for BN, groups
    for GN, positions for LN), as a 0-d float32 tensor on x's device."""
    x = x.float()
    if isinstance(module, _BatchNorm):
        dims = [d for d in range(x.ndim) if d != 1]
        return x.var(dim=dims, unbiased=False).min()
    if isinstance(module, _InstanceNorm):
        return x.flatten(2).var(dim=2, unbiased=False).min()
    if isinstance(module, nn.GroupNorm):
        return x.reshape(x.shape[0], module.num_groups, -1).var(dim=2, unbiased=False).min()
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        dims = list(range(x.ndim - len(shape), x.ndim))
        if isinstance(module, nn.RMSNorm):
            return x.square().mean(dim=dims).min()
        return x.var(dim=dims, unbiased=False).min()
    raise TypeError(type(module).__name__)


def _norm_verdicts(producer: _Producer) -> list[tuple[nn.Parameter, Candidate | None]]:
    """γ of a normalization whose every output reaches per-channel normalizations only through
    linear maps without padding: γ alone is scale-invariant (its β only adds per-channel
    constants, which those normalizations remove: β is dead)."""
    module = producer.module
    if not producer.flows:
        return []
    if not all(_gamma_flow(f) for f in producer.flows):
        return [(module.weight, None)]
    if not _plain_norm(module) and not _affine_output(module, producer.inputs):
        return [(module.weight, None)]  # e.g. timm's BatchNormAct2d with a ReLU/SiLU inside
    through = dict.fromkeys(t for f in producer.flows for t in f.through)
    path = " → ".join([f"{type(module).__name__} γ", *(label for label, _ in through), _norm_labels(producer)])
    reason = f"{path} (linear map, no padding: β is dead)" if through else f"{path} (β is dead)"
    kind = " → ".join([f"{type(module).__name__} γ", *dict.fromkeys(cls for _, cls in through),
                       _norm_kinds(producer)])
    return [(module.weight, Candidate(f"{producer.name}.weight".lstrip("."), reason, "structural",
                                      *_norm_evidence(producer), kind=kind))]


_PLAIN_NORM_FORWARDS = frozenset(
    cls.forward for cls in (_BatchNorm, nn.SyncBatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
)


def _plain_norm(module: nn.Module) -> bool:
    return type(module).forward in _PLAIN_NORM_FORWARDS


def _affine_output(module: nn.Module, inputs: tuple[tuple, dict] | None) -> bool:
    """Whether a norm module with its own forward still outputs ``γ·x̂ + β`` per channel:
    linear in γ (``f(2γ, 0) = 2·f(γ, 0)``) and β only adding a per-channel constant. Re-run
    on the recorded inputs with the parameters swapped in (``functional_call``)."""
    if inputs is None:
        return False
    args, kwargs = inputs
    gamma = module._parameters.get("weight")
    beta = module._parameters.get("bias")
    generator = torch.Generator().manual_seed(0)
    g = generic_values(gamma, generator)
    b = generic_values(beta, generator) if beta is not None else None
    outs = []
    try:
        with torch.no_grad():
            for gv, bv in ((g, None), (2 * g, None), (g, b)):
                swap = {"weight": gv}
                if beta is not None:
                    swap["bias"] = torch.zeros_like(beta) if bv is None else bv
                with forked_rng(module):
                    torch.manual_seed(0)
                    outs.append(isolated_call(module, swap, args, kwargs))
    except Exception:
        return False
    if not all(isinstance(o, Tensor) and o.is_floating_point() and o.ndim >= 2 for o in outs):
        return False
    a0, a2, a1 = (o.detach().double() for o in outs)
    scale = float(a0.norm())
    if scale == 0 or float((a2 - 2 * a0).norm()) > 1e-4 * scale:
        return False
    if beta is None:
        return True
    shift = (a1 - a0).transpose(0, 1).reshape(a0.shape[1], -1)
    return float((shift - shift.mean(dim=1, keepdim=True)).norm()) <= 1e-4 * scale


def _gamma_flow(flow: _Flow) -> bool:
    return (
        _only_norms(flow) and flow.channel_first and not flow.reshaped
        and all(use.per_channel for use in flow.norms)
    )


def _dead_params(producer: _Producer) -> list[tuple[nn.Parameter, str]]:
    """Biases (β) that no change reaches: removed by the per-channel normalization they feed."""
    module = producer.module
    bias = module._parameters.get("bias")
    if not isinstance(bias, nn.Parameter) or not producer.flows:
        return []
    if producer.flows[0].from_norm:
        if all(_gamma_flow(f) for f in producer.flows):
            return [(bias, f"β of {type(module).__name__} → {_norm_labels(producer)}: a per-channel constant it removes")]
        return []
    if is_linear_in_weight(module) and all(_only_norms(f) and _bias_cancels(f, True) for f in producer.flows):
        return [(bias, f"bias of {type(module).__name__} → {_norm_labels(producer)}: a per-channel constant it removes")]
    return []


def _has_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (tuple, list, dict)):
        return any(isinstance(v, Tensor) for v in tree_flatten(value)[0])
    return False


def _functional_norm(name: str, args: tuple, kwargs: dict, tensor: Tensor) -> bool | None:
    """For a normalizing call on ``tensor`` return whether it removes per-channel constants;
    ``None`` when the call is not a normalization with the input's own statistics."""
    if name not in NORM_FUNCS or call_arg(args, kwargs, 0, "input", None) is not tensor:
        return None
    if name == "batch_norm":
        return True if call_arg(args, kwargs, 5, "training", False) else None
    if name == "instance_norm":
        return True if call_arg(args, kwargs, 5, "use_input_stats", True) else None
    if name == "group_norm":
        groups = call_arg(args, kwargs, 1, "num_groups", None)
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


def _norm_kinds(producer: _Producer) -> str:
    """:func:`_norm_labels` without the names: the classes (or functions) of the normalizations."""
    return ", ".join(dict.fromkeys(use.kind for flow in producer.flows for use in flow.norms))


def _norm_evidence(producer: _Producer) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The normalization modules (by name) and the functional normalization calls that the
    producer's outputs feed: :attr:`Candidate.norms`, :attr:`Candidate.functional_norms`."""
    uses = [use for flow in producer.flows for use in flow.norms]
    modules = tuple(dict.fromkeys(use.name for use in uses if use.name is not None))
    functional = tuple(dict.fromkeys(use.label for use in uses if use.name is None))
    return modules, functional


def _linear_verdict(producer: _Producer) -> Candidate | None:
    module = producer.module
    has_bias = getattr(module, "bias", None) is not None
    if not all(_only_norms(f) and _bias_cancels(f, has_bias) for f in producer.flows):
        return None
    reason = f"{type(module).__name__} → {_norm_labels(producer)}"
    return Candidate(f"{producer.name}.weight".lstrip("."), reason, "structural", *_norm_evidence(producer),
                     kind=f"{type(module).__name__} → {_norm_kinds(producer)}")


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
    moved = float((perturbed - base).norm())
    if not (moved > 0 and math.isfinite(moved)) or _close(perturbed, base):
        return None  # the parameter does not change the output: proves nothing
    # compared with what a random change of the direction does, so that a weight-standardizing
    # eps (relative effect ~eps/var(w), 1e-3 on timm NF-nets) does not hide the invariance
    ratio = float((doubled - base).norm()) / moved
    if ratio <= RERUN_TOL:
        producer.rerun_defect[id(param)] = ratio
        reason = _self_normalizing_reason(producer, local)
        weight_norm = reason == _WEIGHT_NORM_REASON
        return Candidate(name, reason, "structural", weight_norm=weight_norm,
                         kind=reason if weight_norm else _SELF_NORMALIZING)
    eps = getattr(producer.module, "eps", None)
    if isinstance(eps, float) and ratio < 0.5 and _close(_rerun_eps(producer, local, param), base):
        producer.eps_notes[name] = (
            f"{type(producer.module).__name__} {producer.name}: self-normalizing, but its eps={eps:g} "
            f"moves the output by {ratio:.1%} of a random change when w doubles"
        )
    if feeds_norms and _positive_multiple(doubled, base, RERUN_TOL * moved):
        scales = f"{type(producer.module).__name__} output scales uniformly → "
        return Candidate(name, scales + _norm_labels(producer), "structural", *_norm_evidence(producer),
                         kind=scales + _norm_kinds(producer))
    return None


def _rerun_eps(producer: _Producer, local: str, param: nn.Parameter) -> Tensor:
    """The doubled output with the module's eps scaled by 4: equal to the base output when the
    module normalizes the parameter and only eps stood in the way."""
    module = producer.module
    eps = module.eps
    try:
        module.eps = 4 * eps
        out = _rerun(module, producer.inputs, local, param)
    finally:
        module.eps = eps
    return out[1] if out is not None else torch.zeros(0)


#: parametrizations ``w = scale · v/‖v‖`` whose direction ``v`` (``original1``) is scale-invariant per unit
_WEIGHT_NORMS = (nn.utils.parametrizations._WeightNorm, ExpWeightNorm)
_WEIGHT_NORM_REASON = "weight_norm direction"
_SELF_NORMALIZING = "self-normalizing: output unchanged when scaled"


def _self_normalizing_reason(producer: _Producer, local: str) -> str:
    module = producer.module
    if local.endswith("weight_v"):
        return _WEIGHT_NORM_REASON
    if local.endswith(".original1") and parametrize.is_parametrized(module):
        tensor_name = local.split(".")[1]
        chain = module.parametrizations[tensor_name]
        if any(isinstance(p, _WEIGHT_NORMS) for p in chain):
            return _WEIGHT_NORM_REASON
    where = f"{type(module).__name__} {producer.name or '<root>'}"
    return f"{_SELF_NORMALIZING} ({where})"


def _rerun(
    module: nn.Module, inputs: tuple[tuple, dict], local: str, param: nn.Parameter
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Outputs of ``module`` on its recorded inputs with ``param`` as is, doubled, and
    perturbed in a random non-radial direction. The parameter is swapped in with
    ``functional_call`` on copies of the buffers and inputs (:func:`isolated_call`): nothing an
    autograd graph saved is written to."""
    args, kwargs = inputs
    outputs = []
    try:
        with torch.no_grad():
            original = param.detach()
            if float(original.float().norm()) == 0.0:
                return None  # scaling zero changes nothing, and proves nothing
            generator = torch.Generator().manual_seed(0)
            noise = torch.randn(original.shape, generator=generator)
            # the module's other tensors at generic values: a zero-init gain or bias would make
            # the output constant (or scale uniformly) by accident
            others = {
                n: generic_values(p, generator)
                for n, p in _testable_params(module)
                if n != local and p is not param
            }
            for value in (original, 2.0 * original, original * (1.0 + 0.5 * noise.to(original))):
                with forked_rng(module):
                    torch.manual_seed(0)
                    outputs.append(isolated_call(module, {**others, local: value}, args, kwargs))
    except Exception:  # a module that cannot be re-run in isolation: no verdict
        return None
    if not all(isinstance(o, Tensor) and o.is_floating_point() for o in outputs):
        return None
    return tuple(o.detach().float() for o in outputs)  # type: ignore[return-value]


def _close(a: Tensor, b: Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    if a.shape != b.shape or scale == 0.0 or not math.isfinite(scale):
        return False
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


def _positive_multiple(a: Tensor, b: Tensor, atol: float) -> bool:
    """Whether ``a ≈ k·b`` for one scalar ``k > 0``, up to ``atol`` in norm."""
    if a.shape != b.shape:
        return False
    denom = float((b * b).sum())
    if denom == 0.0:
        return False
    k = float((a * b).sum()) / denom
    return k > 0 and float((a - k * b).norm()) <= atol


def structural_candidates(module: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Candidate]:
    """Structural candidates from ONE forward ``module(*args, **kwargs)``.

    The pass runs in train mode (BatchNorm normalizes with batch statistics there) under
    ``torch.no_grad()``. Train/eval modes, buffers (BN running statistics,
    ``num_batches_tracked``) and the RNG state are restored afterwards.
    """
    return recorded_forward(module, args, kwargs).candidates or {}


def recorded_forward(module: nn.Module, args: tuple, kwargs: dict) -> DataflowRecorder:
    """A stopped :class:`DataflowRecorder` after one side-effect-free forward pass."""
    modes = [(m, m.training) for m in module.modules()]
    buffers = snapshot_buffers(module)
    try:
        with torch.no_grad(), forked_rng(module):
            module.train()
            with DataflowRecorder(module) as recorder:
                module(*args, **kwargs)
    finally:
        for sub, training in modes:
            sub.training = training
        restore_buffers(buffers)
    return recorder
