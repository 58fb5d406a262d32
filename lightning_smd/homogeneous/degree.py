"""The homogeneity degree L of a network, checked numerically, and the tensors that break it.

``f(c·θ; x) = c^L · f(θ; x)`` for every ``c > 0`` (θ: :mod:`~lightning_smd.homogeneous.scaling`).
:func:`homogeneity_degree` measures L two independent ways:

* **scaling**: ``L_c = log(⟨f(cθ), f(θ)⟩ / ‖f(θ)‖²) / log c`` for several ``c``; L is their mean and
  the residual ``max_c ‖f(cθ) − c^L f(θ)‖ / ‖c^L f(θ)‖`` must stay under the tolerance;
* **Euler's identity** ``⟨θ, ∇_θ f⟩ = L·f``, read on ``φ = ⟨f(θ), sg(f(θ))⟩/‖sg(f(θ))‖`` (sg: no gradient):
  ``L_Euler = ⟨θ, ∇_θ φ⟩ / φ``.

When f is not homogeneous, the same scaled forward passes locate the cause, with no list of
names: every module's output is recorded, and a module whose inputs scale as a power of c but
whose output does not *breaks* homogeneity. Each of its own tensors is then zeroed in turn; one
whose removal makes the module's output homogeneous is named (a bias after the first layer: it
enters with degree 1, the signal with degree d+1). A module no single tensor repairs is named
whole (a normalization layer in eval mode: its running statistics do not scale; an additive
constant in a ``forward``). The search then continues past it (the tensor stays zeroed, or the
module's output is replaced by a homogeneous stand-in) to find the next one.

Tensors that are exactly zero (a zero-initialized bias) cannot show whether they break
homogeneity, so the check runs at a generic point: they get small random values first. Every
parameter is restored afterwards; the model is used in its current train/eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_smd.homogeneous.scaling import ScaleHandle, scale_handles

__all__ = ["Homogeneity", "homogeneity_degree"]

DEFAULT_SCALES = (0.5, 2.0, 3.0)


@dataclass(frozen=True)
class Homogeneity:
    """What :func:`homogeneity_degree` found.

    Attributes:
        homogeneous: the verdict (scaling residual and Euler's identity within ``tolerance``).
        degree: L (rounded to an integer when within tolerance of one); ``None`` when not homogeneous.
        scale_degrees: ``c → L_c``.
        euler_degree: ``⟨θ, ∇_θ φ⟩ / φ``.
        error: the largest relative residual ``‖f(cθ) − c^L f(θ)‖ / ‖c^L f(θ)‖``.
        tolerance: the tolerance of the verdict.
        breakers: tensor or module name → why it breaks homogeneity (empty when homogeneous).
        generic: tensors that were exactly zero and got generic values for the check.
    """

    homogeneous: bool
    degree: float | None
    scale_degrees: dict[float, float]
    euler_degree: float
    error: float
    tolerance: float
    breakers: dict[str, str] = field(default_factory=dict)
    generic: tuple[str, ...] = ()

    def message(self) -> str:
        """One paragraph for a user: the degree, or what breaks homogeneity and what to do."""
        if self.homogeneous:
            return (f"homogeneous of degree L = {self.degree:g} (scaling residual {self.error:.1e}, "
                    f"Euler's identity gives {self.euler_degree:.4f})")
        by = (f"L by scaling {', '.join(f'{v:.3f}' for v in self.scale_degrees.values())}, "
              f"by Euler's identity {self.euler_degree:.3f}")
        if self.error <= self.tolerance:  # scaling holds: Euler's identity disagrees (or is not finite)
            lines = [f"not homogeneous: Euler's identity ⟨θ, ∇_θ f⟩ = L·f fails (scaling residual {self.error:.1e}; {by})."]
        else:
            lines = [f"not homogeneous: f(c·θ) ≠ c^L·f(θ) (scaling residual {self.error:.1e} > {self.tolerance:g}; {by})."]
        if self.breakers:
            lines.append("Tensors that break it:")
            lines += [f"  {name}: {why}" for name, why in self.breakers.items()]
            lines.append("Remove biases after the first layer, normalization layers and additive constants "
                         "(or measure a homogeneous sub-network).")
        return "\n".join(lines)


def _flat(out: Any) -> Tensor | None:
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]
    if not leaves:
        return None
    return torch.cat([t.detach().reshape(-1).double() for t in leaves])


def _fit(base: Tensor, scaled: dict[float, Tensor]) -> tuple[float | None, dict[float, float], float]:
    """``(L, {c: L_c}, residual)`` of ``y(c) = c^L y(1)``; ``L=None`` when ``y(1) = 0``."""
    denom = float((base * base).sum())
    if denom == 0.0 or not math.isfinite(denom):
        return None, {}, 0.0 if denom == 0.0 else math.inf
    per_c: dict[float, float] = {}
    for c, y in scaled.items():
        ratio = float((y * base).sum()) / denom
        per_c[c] = math.log(ratio) / math.log(c) if ratio > 0 and math.isfinite(ratio) else math.nan
    if not all(math.isfinite(v) for v in per_c.values()):
        return None, per_c, math.inf
    degree = sum(per_c.values()) / len(per_c)
    err = max(float((y - c**degree * base).norm()) / (c**degree * math.sqrt(denom)) for c, y in scaled.items())
    return degree, per_c, err


class _Recorder:
    """Forward hooks on every module: inputs and outputs of one pass, flattened; optional
    stand-ins (``name → degree``) that replace a module's output by ``c^d ×`` its unscaled one."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.inputs: dict[str, list[Tensor]] = {}
        self.outputs: dict[str, list[Tensor]] = {}
        self.stand_ins: dict[str, float] = {}
        self.unscaled: dict[str, list[Any]] = {}
        self.scale = 1.0
        self.calls: dict[str, int] = {}
        self.varies: dict[str, bool] = {}
        self.handles = []
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name: str):
        def hook(module, args):
            flat = _flat(args)
            if flat is not None:
                self.inputs.setdefault(name, []).append(flat)
        return hook

    def _post(self, name: str):
        def hook(module, args, out):
            if name in self.stand_ins and isinstance(out, Tensor):
                k = self.calls.get(name, 0)
                self.calls[name] = k + 1
                if self.scale == 1.0:
                    self.unscaled.setdefault(name, []).append(out.detach())
                else:
                    out = self.unscaled[name][k] * self.scale ** self.stand_ins[name]
            flat = _flat(out)
            if flat is not None:
                self.outputs.setdefault(name, []).append(flat)
                if isinstance(out, Tensor) and out.dim() >= 1 and out.shape[0] > 1:
                    rows = out.detach().reshape(out.shape[0], -1).double()
                    self.varies[name] = self.varies.get(name, False) or bool((rows - rows[:1]).abs().max() > 0)
            return out
        return hook

    def run(self, fn, scale: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        self.inputs, self.outputs, self.calls, self.scale = {}, {}, {}, scale
        if scale == 1.0:
            self.varies = {}
        if scale == 1.0:
            self.unscaled = {}
        fn()
        cat = lambda d: {k: torch.cat(v) for k, v in d.items()}  # noqa: E731
        return cat(self.inputs), cat(self.outputs)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _as_args(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def homogeneity_degree(
    model: nn.Module,
    inputs: Any,
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    tolerance: float = 1e-3,
    max_breakers: int = 16,
) -> Homogeneity:
    """Measure the homogeneity degree of ``model`` on ``inputs`` (a tensor, or a tuple of
    positional arguments), and name what breaks it. See the module docstring.

    Args:
        scales: the values of ``c`` (each > 0, ≠ 1).
        tolerance: relative tolerance of the scaling residual and of ``|L_Euler − L| / max(1, L)``.
        max_breakers: stop the search after this many breakers.
    """
    if any(c <= 0 or c == 1 for c in scales) or len(scales) < 1:
        raise ValueError(f"scales must be positive and different from 1, got {tuple(scales)}")
    args = _as_args(inputs)
    handles = scale_handles(model)
    saved = {id(h.param): h.param.detach().clone() for h in handles}
    saved_all = {id(t): (t, t.detach().clone()) for t in list(model.parameters()) + list(model.buffers())}
    generic = _generic_point(handles)
    recorder = _Recorder(model)
    try:
        with torch.random.fork_rng(devices=[]):
            result = _measure(model, args, handles, saved, recorder, scales, tolerance, max_breakers, generic)
    finally:
        recorder.close()
        with torch.no_grad():
            for t, value in saved_all.values():
                t.copy_(value)
    return result


def _generic_point(handles: list[ScaleHandle]) -> tuple[str, ...]:
    names = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for h in handles:
            if h.kind == "plain" and h.param.numel() and not bool(h.param.detach().any()):
                h.param.copy_(0.1 * torch.randn(h.param.shape, generator=gen).to(h.param))
                names.append(h.name)
    return tuple(names)


def _scaled_runs(model, args, handles, recorder, scales) -> dict[float, tuple[dict, dict]]:
    def forward():
        torch.manual_seed(0)
        model(*args)

    base = {id(h.param): h.param.detach().clone() for h in handles}
    runs = {}
    with torch.no_grad():
        for c in (1.0, *scales):
            try:
                for h in handles:
                    h.scale_(c) if c != 1.0 else None
                runs[c] = recorder.run(forward, c)
            finally:
                for h in handles:
                    h.param.copy_(base[id(h.param)])
    return runs


def _euler(model: nn.Module, args: tuple, handles: list[ScaleHandle]) -> float:
    params = [h.param for h in handles]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            torch.manual_seed(0)
            out = [t for t in tree_flatten(model(*args))[0] if isinstance(t, Tensor) and t.is_floating_point()]
            # φ = ⟨f, sg(f)/‖sg(f)‖⟩: the same L_Euler as ⟨f, sg(f)⟩, with a backward pass of
            # gradient-norm 1 at the output (‖f‖² overflows float32 late in training)
            scale = torch.sqrt(sum((t.detach().double() ** 2).sum() for t in out)) if out else 1.0
            scale = scale if float(scale) > 0 else 1.0
            phi = sum((t.double() * (t.detach().double() / scale)).sum() for t in out)
            grads = torch.autograd.grad(phi, params, allow_unused=True)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    radial = sum(float(h.radial(g.double() if g is not None else torch.zeros((), dtype=torch.float64)))
                 for h, g in zip(handles, grads) if g is not None)
    phi = float(phi.detach())
    return radial / phi if phi != 0 else math.nan


def _measure(model, args, handles, saved, recorder, scales, tol, max_breakers, generic) -> Homogeneity:
    runs = _scaled_runs(model, args, handles, recorder, scales)
    base_out = runs[1.0][1].get("")
    degree, per_c, err = _fit(base_out, {c: runs[c][1][""] for c in scales}) if base_out is not None else (None, {}, math.inf)
    euler = _euler(model, args, handles)
    ok_scaling = degree is not None and err <= tol
    ok_euler = degree is not None and math.isfinite(euler) and abs(euler - degree) <= tol * max(1.0, abs(degree))
    if ok_scaling and ok_euler:
        rounded = float(round(degree))
        degree = rounded if abs(degree - rounded) <= tol * max(1.0, abs(degree)) else degree
        return Homogeneity(True, degree, per_c, euler, err, tol, {}, generic)
    breakers = _find_breakers(model, args, handles, recorder, scales, tol, max_breakers, runs)
    return Homogeneity(False, None, per_c, euler, err, tol, breakers, generic)


def _homogeneous(record: dict[float, tuple[dict, dict]], which: int, name: str, scales, tol) -> tuple[bool, float | None]:
    base = record[1.0][which].get(name)
    if base is None:
        return True, None
    degree, _, err = _fit(base, {c: record[c][which][name] for c in scales})
    return err <= tol, degree


def _first_breakers(model, runs, scales, tol) -> list[tuple[str, float | None]]:
    """Modules whose inputs are homogeneous and whose output is not, none inside another."""
    found = []
    for name in runs[1.0][1]:
        ok_out, _ = _homogeneous(runs, 1, name, scales, tol)
        if ok_out:
            continue
        ok_in, d_in = _homogeneous(runs, 0, name, scales, tol)
        if ok_in:
            found.append((name, d_in))
    return [(n, d) for n, d in found if not any(o != n and o.startswith(f"{n}.") or (n == "" and o) for o, _ in found)]


def _direct_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    out = [(n, p) for n, p in module.named_parameters(recurse=False)]
    out += [(n, b) for n, b in module.named_buffers(recurse=False) if b.is_floating_point()]
    if hasattr(module, "parametrizations"):
        out += [(f"parametrizations.{n}", p) for n, p in module.parametrizations.named_parameters()]
    return out


def _find_breakers(model, args, handles, recorder, scales, tol, max_breakers, runs) -> dict[str, str]:
    breakers: dict[str, str] = {}
    modules = dict(model.named_modules())
    for _ in range(max_breakers):
        first = [(n, d) for n, d in _first_breakers(model, runs, scales, tol) if n not in recorder.stand_ins]
        if not first:
            break
        for name, d_in in first:
            module = modules[name]
            prefix = f"{name}." if name else ""
            named = False
            for local, tensor in _direct_tensors(module):
                if not tensor.numel() or not bool(tensor.detach().any()):
                    continue
                keep = tensor.detach().clone()
                with torch.no_grad():
                    tensor.zero_()
                trial = _scaled_runs(model, args, handles, recorder, scales)
                ok, d_rest = _homogeneous(trial, 1, name, scales, tol)
                # the rest must still carry the signal: zeroing a weight leaves a constant bias
                if ok and d_rest is not None and recorder.varies.get(name, True):
                    own = "degree 1 (a parameter)" if isinstance(tensor, nn.Parameter) else "degree 0 (a buffer)"
                    breakers[prefix + local] = (f"{type(module).__name__} {name or '<root>'}: it enters with {own}, "
                                                f"the rest of the output with degree {d_rest:.3g}")
                    named = True
                    break  # stays zeroed: the search goes on past it
                with torch.no_grad():
                    tensor.copy_(keep)
            if not named:
                tensors = [n for n, _ in _direct_tensors(module)]
                what = (f"its output does not scale as a power of c although its input does "
                        f"(tensors: {', '.join(tensors)}; a normalization layer's statistics do not scale)"
                        if tensors else
                        "its forward adds a term that does not scale with θ (an additive constant or a "
                        "non-homogeneous operation)")
                breakers[name or "<root>"] = f"{type(module).__name__}: {what}"
                recorder.stand_ins[name] = d_in if d_in is not None else 0.0
            if len(breakers) >= max_breakers:
                break
        runs = _scaled_runs(model, args, handles, recorder, scales)
        if _homogeneous(runs, 1, "", scales, tol)[0] and _homogeneous(runs, 1, "", scales, tol)[1] is not None:
            break
    recorder.stand_ins.clear()
    return breakers
