"""Numerical detection: radial cosines ``|<g, w>| / (||g||·||w||)`` of gradients, accumulated on device."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_smd.core.detect.candidate import clean_name
from lightning_smd.core.detect.sandbox import forked_rng, restore_buffers, snapshot_buffers

__all__ = ["CHANCE", "RadialCosineCheck", "confirm_scale_invariance", "discovery_threshold", "precision_floor"]


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
        self._carried: dict[str, float] = {}  # maxima of the updates before a checkpoint (load_state_dict)

    @property
    def steps(self) -> int:
        """Number of :meth:`update` calls so far."""
        return self._steps

    def update(self) -> None:
        """Accumulate the radial cosines of the current gradients, on device."""
        groups: dict[torch.device, list[int]] = {}
        for i, param in enumerate(self._params):
            # sharded: every column goes to the reduction (it matches columns to shard layouts);
            # a tensor without gradient sums to zero there and is skipped by the g_sq > 0 mask
            if param.grad is not None or self._reduce_fn is not None:
                groups.setdefault(_local(param).device, []).append(i)
        for device, indices in groups.items():
            self._update_group(device, indices)
        self._steps += 1

    def _update_group(self, device: torch.device, indices: list[int]) -> None:
        weights = [_local(self._params[i]).detach().reshape(-1) for i in indices]
        grads = [_local(g).reshape(-1) if (g := self._params[i].grad) is not None else torch.zeros_like(w)
                 for i, w in zip(indices, weights)]
        # statistics in at least float32; float64 tensors stay float64
        acc = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
        dots = torch.stack([torch.dot(w.to(acc), g.to(acc)) for w, g in zip(weights, grads)])
        w_sq = _squared_norms(weights, acc)
        g_sq = _squared_norms(grads, acc)
        sums = torch.stack([dots, w_sq, g_sq])
        if self._reduce_fn is not None:
            sums = self._reduce_fn(sums)
        dot, w_sq, g_sq = sums.unbind(0)
        cosine = dot.abs() / (w_sq.sqrt() * g_sq.sqrt())
        cosine = torch.where((w_sq > 0) & (g_sq > 0), cosine, torch.nan)
        if device not in self._max or self._max[device].dtype != torch.promote_types(self._max[device].dtype, acc):
            previous = self._max.get(device)
            self._max[device] = torch.full((len(self._params),), torch.nan, device=device, dtype=acc)
            if previous is not None:
                self._max[device].copy_(previous)
        index = self._index_tensor(device, indices)
        running = self._max[device]
        running[index] = torch.fmax(running[index], cosine.to(running.dtype))  # fmax ignores NaN (skipped)

    def _index_tensor(self, device: torch.device, indices: list[int]) -> Tensor:
        key = (device, tuple(indices))
        if key not in self._index:
            self._index[key] = torch.tensor(indices, dtype=torch.long, device=device)
        return self._index[key]

    def result(self) -> dict[str, float]:
        """Maximum radial cosine per name (NaN if never measured); one host transfer."""
        values = [self._carried.get(name, math.nan) for name in self._names]
        for running in self._max.values():
            for i, value in enumerate(running.cpu().tolist()):
                if not math.isnan(value):
                    values[i] = value if math.isnan(values[i]) else max(values[i], value)
        return dict(zip(self._names, values))

    def state_dict(self) -> dict[str, Any]:
        """The updates counted and the maxima so far (host floats: one transfer), so a run resumed
        from a checkpoint taken during detection decides on the same evidence at the same step."""
        return {"steps": self._steps, "max": self.result()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the maximum over all updates, before and after it, is
        the same as without the interruption (a maximum is exact in any order)."""
        self._steps = int(state["steps"])
        self._carried = {str(n): float(v) for n, v in state["max"].items() if not math.isnan(float(v))}
        self._max = {}


def _squared_norms(tensors: list[Tensor], acc: torch.dtype) -> Tensor:
    """Squared 2-norms in ``acc`` (float32 or float64), one fused call per input dtype."""
    out: list[Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        # _foreach_norm's dtype= only up-casts: float64 inputs keep their own precision
        kwargs = {} if dtype == torch.float64 else {"dtype": torch.float32}
        norms = torch._foreach_norm([tensors[i] for i in idx], 2, **kwargs)
        for i, n in zip(idx, norms):
            out[i] = n.to(acc)
    return torch.stack(out).square()  # type: ignore[arg-type]


def projection_loss(output: Any) -> Tensor:
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


def radial_cosines(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, float]:
    """Radial cosine of every trainable tensor after one backward, on a deep copy."""
    replica = copy.deepcopy(module)
    replica.train()
    with forked_rng(replica):
        torch.manual_seed(0)
        projection_loss(replica(*args, **kwargs)).backward()
    check = RadialCosineCheck(
        [(clean_name(n), p) for n, p in replica.named_parameters() if p.requires_grad]
    )
    check.update()
    return check.result()



# --------------------------------------------------------------------------------------------
# Evidence that scales with the tensor: size-aware threshold and a finite-difference check
# --------------------------------------------------------------------------------------------

#: A non-invariant tensor of ``n`` entries shows a radial cosine of about ``|z|/√n`` (z standard
#: normal) by chance; a discovery needs ``cos < CHANCE/√n``, which chance gives with probability
#: ≈ 0.8·CHANCE per measured step (0.8 % for one step, ~5e-7 for the callback's three).
CHANCE = 1e-2


def precision_floor(dtype: torch.dtype) -> float:
    """Radial cosine a truly invariant tensor stored in ``dtype`` can show from rounding alone."""
    if dtype in (torch.float16, torch.bfloat16):
        return 3e-3 if dtype == torch.float16 else 1e-2
    return 10 * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def discovery_threshold(threshold: float, numel: int, dtype: torch.dtype = torch.float32) -> float:
    """The radial cosine under which a tensor *not* explained by structure counts as invariant:
    ``min(threshold, max(CHANCE/√numel, precision_floor(dtype)))``."""
    return min(threshold, max(CHANCE / math.sqrt(max(numel, 1)), precision_floor(dtype)))


def generic_values(p: Tensor, generator: torch.Generator) -> Tensor:
    """A random point near ``p`` that breaks init coincidences: vectors (biases, γ, β, layer
    scale) get O(0.3) noise around their values, constant-filled matrices random values."""
    noise = torch.randn(p.shape, generator=generator).to(device=p.device, dtype=p.dtype)
    flat = p.detach().reshape(-1)
    if p.ndim <= 1:
        return p.detach() + 0.3 * max(float(flat.float().abs().mean()), 1.0) * noise
    if flat.numel() and bool((flat == flat[0]).all()):
        fan_in = max(flat.numel() // p.shape[0], 1)
        return noise / math.sqrt(fan_in)
    return p.detach()


def _flat_outputs(value: Any) -> list[Tensor]:
    return [t.detach().reshape(-1).float() for t in tree_flatten(value)[0]
            if isinstance(t, Tensor) and t.is_floating_point()]


def _distance(a: list[Tensor], b: list[Tensor]) -> float:
    if len(a) != len(b) or not a:
        return math.nan
    total = sum(float(torch.sum((x.double() - y.double()) ** 2)) for x, y in zip(a, b))
    return math.sqrt(total)


def confirm_scale_invariance(
    module: nn.Module,
    names: list[str],
    run: Callable[[], Any],
    seed: int = 0,
    tol: float | None = None,
) -> dict[str, str | None]:
    """Finite-difference check of ``w → 2w`` for each tensor in ``names`` (clean names).

    Runs ``run()`` (one forward on a fixed batch, returning outputs or a loss: any pytree of
    tensors) at a *generic point*: every vector parameter (bias, γ, β, layer scale) and every
    constant-filled matrix of ``module`` is moved to random values first, since init values
    (β = 0, zero biases, layer scale 1e-6) make non-invariant tensors invariant by accident. For
    each tensor, the outputs with ``w`` doubled must move less than ``tol`` times as much as with
    ``w`` perturbed in a random direction by 30 % of its norm (and that perturbation must move
    them measurably). Exact for invariant tensors up to rounding, whatever their size.

    ``module`` is changed in place while it runs and fully restored (parameters, buffers, RNG,
    train/eval modes untouched); runs under ``torch.no_grad()``. Costs ``1 + 2·len(names)``
    forwards. Returns ``{name: None}`` when confirmed, ``{name: why}`` when refuted.
    """
    params = {clean_name(n): p for n, p in module.named_parameters()}
    names = [n for n in names if n in params]
    if not names:
        return {}
    dtype = params[names[0]].dtype
    tol = tol if tol is not None else (5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3)
    generator = torch.Generator().manual_seed(seed)
    saved = {n: p.detach().clone() for n, p in params.items()}
    buffers = snapshot_buffers(module)

    def outputs() -> list[Tensor]:
        with forked_rng(module):
            torch.manual_seed(seed)
            out = _flat_outputs(run())
        restore_buffers(buffers)
        return out

    verdicts: dict[str, str | None] = {}
    try:
        with torch.no_grad():
            for p in params.values():
                p.copy_(generic_values(p, generator))
            base = outputs()
            size = math.sqrt(sum(float(torch.sum(t.double() ** 2)) for t in base))
            floor = 100 * torch.finfo(dtype).eps * size
            for name in names:
                p = params[name]
                w = p.detach().clone()
                if float(w.float().norm()) == 0.0:
                    verdicts[name] = "zero tensor: scaling proves nothing"
                    continue
                noise = torch.randn(w.shape, generator=generator).to(w)
                noise *= 0.3 * float(w.float().norm()) / max(float(noise.float().norm()), 1e-30)
                p.copy_(w + noise)
                moved = _distance(outputs(), base)
                p.copy_(2.0 * w)
                doubled = _distance(outputs(), base)
                p.copy_(w)
                if not (moved > floor):
                    verdicts[name] = "no measurable effect on the outputs (dead, or too weak to judge)"
                elif not (doubled <= tol * moved):
                    verdicts[name] = f"doubling it moves the outputs {doubled / moved:.1e}× as much as a random change"
                else:
                    verdicts[name] = None
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        restore_buffers(buffers)
    return verdicts
