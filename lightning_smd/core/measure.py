"""Per-step SMD statistics computed on device: angular update Δ_t, ‖w_t‖ and the unit-gradient L.

One measured optimizer step is two calls: :meth:`StepMeasurer.before_step` (gradients final,
weights still ``w_t``) and :meth:`StepMeasurer.after_step` (weights now ``w_{t+1}``). They compute
per-tensor *partial sums* (squared norms and dot products); the sums are stacked into one ``[5, N]``
tensor, reduced across shards once (``reduce_fn``), and only then combined non-linearly. Nothing is
moved to the host here.

A measured step is bound by memory bandwidth, so the sums are arranged to read as little as
possible: after the step, per tensor, ‖w_{t+1}‖², ‖s‖² and ⟨w_{t+1}, s⟩ with ``s`` the update's
source (below), taken back to back; ``w_t`` is never read, its norm follows from these three
(``w_t = w_{t+1} − u``). Before the step only the unit-gradient sums are taken, on the steps that
sample it, and the snapshot is copied (snapshot mode). With momentum that is 4 reads of the tracked
tensors per measured step (7 when L is sampled). On CPU every sum is one BLAS ``dot``, which streams
at the memory bandwidth; torch's CPU ``vector_norm`` (what ``_foreach_norm`` loops over there) takes
~1.7× as long (``benchmarks/measure_step.py``).

How the update ``u = w_{t+1} − w_t`` is known, per param group (the *mode*):

* ``"buffer"``: ``torch.optim.SGD`` with heavy-ball momentum. After the step ``u = −η·buf`` exactly,
  so no copy of ``w_t`` is kept.
* ``"grad"``: ``torch.optim.SGD`` without momentum. ``u = −η(g + λw_t)`` with the gradient the step
  used (after clipping), ``w_t`` reconstructed as ``(w_{t+1} + ηg)/(1 − ηλ)``. No copy either.
* ``"snapshot"``: anything else (AdamW, Lion, Nesterov, unknown optimizers). ``w_t`` is copied into
  a persistent buffer (allocated once, the size of the tracked tensors) and ``−u`` is formed in it,
  in place, after the step.

Δ_t uses the stable form ``atan2(‖u_⊥‖, ‖w_t‖ + ⟨ŵ_t, u⟩)``, never ``acos`` of a cosine.

Per invariance unit (``GroupSlice.units``; see :mod:`lightning_smd.units`): a tensor of ``k`` units
(output channels under BatchNorm, channel groups under GroupNorm, heads under a per-head norm) is
viewed, in memory order, as ``[k, numel/k]`` rows (dim 0 is outermost for contiguous and
``channels_last`` weights alike) and every sum above is taken per row (``vector_norm(dim=1)`` for
squared norms, ``torch.linalg.vecdot`` for dots) in the same pass that reads the tensor; the tensor's own sum is the sum of its rows' (one
``index_add_`` for all tensors). No extra read, no per-unit Python loop: the unit columns are
appended after the tensor columns of the ``[5, ·]`` partial sums, reduced with them, and combined
by the same formulas (every unit of a tensor shares its η, λ, μ and mode). On CPU the row norms
stream as fast as one ``dot``, the row ``vecdot`` ~1.4× slower (``benchmarks/measure_step.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["GroupSlice", "StepMeasurer", "angular_update", "local", "measurement_mode"]

ReduceFn = Callable[[Tensor], Tensor]


def local(t: Tensor) -> Tensor:
    """The locally held part of ``t`` (a DTensor's shard; a plain tensor itself)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def angular_update(w_old: Tensor, w_new: Tensor) -> Tensor:
    """Angle between ``w_old`` and ``w_new`` in radians, accurate for tiny angles in fp32.

    ``atan2(‖u_⊥‖, ‖w‖ + ⟨ŵ, u⟩)`` with ``u = w_new − w_old``: no cancellation for small angles,
    unlike ``acos`` of the cosine (15 % off at 1e-3 rad in fp32, 0 at 3e-4).
    """
    w = w_old.reshape(-1).float()
    u = w_new.reshape(-1).float() - w
    w_sq = torch.dot(w, w)
    return _angle(w_sq, torch.dot(u, u), torch.dot(w, u))


def _angle(w_sq: Tensor, u_sq: Tensor, wu: Tensor) -> Tensor:
    w_norm = w_sq.sqrt()
    radial = wu / w_norm
    perp = (u_sq - radial * radial).clamp_min(0.0).sqrt()
    return torch.atan2(perp, w_norm + radial)


def measurement_mode(optimizer: torch.optim.Optimizer, group: dict) -> str:
    """``"buffer"``, ``"grad"`` or ``"snapshot"``: how this group's update can be recovered exactly."""
    exact_sgd = (
        type(optimizer) is torch.optim.SGD
        and not group.get("nesterov", False)
        and not group.get("maximize", False)
    )
    if not exact_sgd:
        return "snapshot"
    return "buffer" if group.get("momentum", 0.0) != 0 else "grad"


@dataclass
class GroupSlice:
    """The tracked tensors of one optimizer param group: positions ``[start, start+len(params))``."""

    optimizer: torch.optim.Optimizer
    group_index: int
    params: list[Tensor]
    start: int
    mode: str
    snapshot: list[Tensor] | None = None
    # hyper-parameters read before the step (a step-interval scheduler changes them before
    # on_train_batch_end, so they must be remembered)
    lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    #: invariance units per tensor (``None``: per-tensor statistics only); ``units[i]`` divides
    #: ``params[i].shape[0]`` and the unit columns of the statistics follow the tensor columns
    units: list[int] | None = None
    _zeros: dict[int, Tensor] = field(default_factory=dict)
    _not_sampled: Tensor | None = None  # the NaN rows of a step that does not sample L (never mutated)
    _segments: dict[torch.device, Tensor] = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        """How many unit columns this slice adds to the statistics (0 without per-unit statistics)."""
        return sum(self.units) if self.units is not None else 0

    def segments(self, device: torch.device) -> Tensor:
        """Device index: the tensor (0-based within the slice) each unit column belongs to (cached)."""
        seg = self._segments.get(device)
        if seg is None:
            seg = self._segments[device] = torch.repeat_interleave(
                torch.arange(len(self.params)), torch.tensor(self.units)).to(device)
        return seg

    @property
    def group(self) -> dict:
        return self.optimizer.param_groups[self.group_index]

    @property
    def stop(self) -> int:
        return self.start + len(self.params)

    def grads(self) -> list[Tensor]:
        """Local gradients; a tensor that got no gradient this step counts as zero."""
        out = []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                g = self._zeros.get(i)
                if g is None:
                    g = self._zeros[i] = torch.zeros_like(local(p))
            out.append(local(g))
        return out

    def buffers(self) -> list[Tensor | None]:
        state = self.optimizer.state
        return [state[p].get("momentum_buffer") if p in state else None for p in self.params]


def _fp32_cpu(tensors: Sequence[Tensor]) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _sq_norms(tensors: Sequence[Tensor]) -> Tensor:
    tensors = list(tensors)
    if _fp32_cpu(tensors):
        # one BLAS dot per tensor reads it at the memory bandwidth; CPU foreach_norm is a loop of
        # vector_norm, which takes ~1.7x as long (benchmarks/measure_step.py)
        return torch.stack([torch.dot(v, v) for v in (_flat(t) for t in tensors)])
    if any(t.dtype == torch.float64 for t in tensors):  # float64 stays float64
        return torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors]).square()
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)  # CUDA: one multi-tensor kernel
    return torch.stack(norms).square()


def _flat(x: Tensor) -> Tensor:
    """``x`` as a 1-D tensor in memory order (a view for any dense layout), for sums over elements."""
    return _flat_pair(x, x)[0]


def _flat_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` and ``y`` as 1-D tensors in the same element order, as views where possible.

    Contiguous tensors are viewed; tensors with identical non-contiguous but dense strides
    (``channels_last`` weights and their gradients, buffers and snapshots) are viewed in memory
    order, which is all a dot product needs. Anything else is reshaped (a copy).
    """
    if x.is_contiguous() and y.is_contiguous():
        return x.view(-1), y.view(-1)
    if x.shape == y.shape and x.stride() == y.stride():
        order = sorted(range(x.dim()), key=lambda i: (-x.stride(i), -x.shape[i]))
        xp, yp = x.permute(order), y.permute(order)
        if xp.is_contiguous() and yp.is_contiguous():
            return xp.view(-1), yp.view(-1)
    return x.reshape(-1), y.reshape(-1)


def _rows_pair(x: Tensor, y: Tensor, units: int) -> tuple[Tensor, Tensor]:
    """``x`` and ``y`` as ``[units, numel/units]`` rows, unit ``j`` holding ``x[j·C/units:(j+1)·C/units]``
    (``C = x.shape[0]``), with the same element order in both; views for contiguous and
    ``channels_last`` tensors (dim 0 outermost in memory), a copy otherwise."""
    if x.is_contiguous() and y.is_contiguous():
        return x.view(units, -1), y.view(units, -1)
    if x.shape == y.shape and x.stride() == y.stride():
        order = sorted(range(x.dim()), key=lambda i: (-x.stride(i), -x.shape[i]))
        xp, yp = x.permute(order), y.permute(order)
        if order[0] == 0 and xp.is_contiguous() and yp.is_contiguous():
            return xp.view(units, -1), yp.view(units, -1)
    return x.reshape(units, -1), y.reshape(units, -1)


def _row_sq_norms(rows: Tensor) -> Tensor:
    """‖row‖² per row, accumulated in fp32: a row-wise ``vector_norm`` reads the rows once, as fast as
    one ``dot`` of the whole tensor on CPU (``vecdot(x, x)`` takes ~1.6× as long)."""
    return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).square()


def _unit_sums(xs: Sequence[Tensor], ys: Sequence[Tensor | None], units: Sequence[int], rows: str,
               subtract: bool = False, last_first: bool = False) -> Tensor:
    """Per-unit sums ``[len(rows), Σunits]``, the units of ``xs[0]`` first.

    ``rows`` names the sums, in order: ``"x"`` ‖x‖², ``"y"`` ‖y‖², ``"d"`` ⟨x, y⟩; a ``y`` that is
    ``None`` counts as zero. Each sum is one row-wise reduction (fp32) over the ``[units, ·]`` view
    of the pair (``vector_norm`` for squared norms, ``vecdot`` for the dot), so a tensor is read
    once per sum for all its units. ``subtract`` and ``last_first``
    as in :func:`_pair_sums`.
    """
    per_pair: list[Tensor | None] = [None] * len(xs)
    order = range(len(xs) - 1, -1, -1) if last_first else range(len(xs))
    for i in order:
        x, y, k = xs[i], ys[i], units[i]
        if y is None:
            xx = _row_sq_norms(_rows_pair(x, x, k)[0])
            per_pair[i] = torch.stack([xx if r == "x" else torch.zeros_like(xx) for r in rows])
            continue
        if subtract:
            y.sub_(x)
        xr, yr = _rows_pair(x, y, k)
        sums = {"x": lambda: _row_sq_norms(xr), "y": lambda: _row_sq_norms(yr),
                "d": lambda: torch.linalg.vecdot(xr.float(), yr.float())}
        per_pair[i] = torch.stack([sums[r]() for r in rows])
    return torch.cat(per_pair, dim=1)


def _tensor_and_unit_sums(s: GroupSlice, xs: Sequence[Tensor], ys: Sequence[Tensor | None], rows: str,
                          subtract: bool = False, last_first: bool = False) -> Tensor:
    """``[len(rows), n + Σunits]``: the per-tensor sums (each the sum of its units') then the per-unit ones."""
    per_unit = _unit_sums(xs, ys, s.units, rows, subtract, last_first)
    per_tensor = per_unit.new_zeros(len(rows), len(xs)).index_add_(1, s.segments(per_unit.device), per_unit)
    return torch.cat([per_tensor, per_unit], dim=1)


def _dots(xs: Sequence[Tensor], ys: Sequence[Tensor | None]) -> Tensor:
    # torch has no foreach dot; one small kernel per tensor, no host sync. `.float()` is free for
    # fp32 tensors (it returns the tensor itself). A missing `y` (no momentum buffer yet) is zero.
    out = []
    for x, y in zip(xs, ys):
        if y is None:
            out.append(torch.zeros((), dtype=torch.float32, device=x.device))
        else:
            xf, yf = _flat_pair(x, y)
            acc = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32  # float64 stays float64
            out.append(torch.dot(xf.to(acc), yf.to(acc)))
    return torch.stack(out)


def _pair_sums(xs: Sequence[Tensor], ys: Sequence[Tensor | None], y_sq: bool = True,
               subtract: bool = False, last_first: bool = False) -> Tensor:
    """Rows ‖x‖², ‖y‖² (only if ``y_sq``) and ⟨x, y⟩ per pair; a ``y`` that is ``None`` counts as zero.

    ``subtract``: first ``y -= x`` in place (a snapshot ``w_t`` becomes ``w_t − w_{t+1}``).
    ``last_first``: on CPU, visit the pairs from the last one (right after an optimizer step, the
    tensors it updated last are still in cache: ~7 % less time on resnet18).
    """
    if _fp32_cpu(xs) and _fp32_cpu([y for y in ys if y is not None]):
        per_pair: list[list[Tensor]] = [[] for _ in xs]
        order = range(len(xs) - 1, -1, -1) if last_first else range(len(xs))
        for i in order:
            x, y = xs[i], ys[i]
            if y is None:
                xf = _flat(x)
                zero = torch.zeros((), dtype=torch.float32)
                per_pair[i] = [torch.dot(xf, xf), zero, zero] if y_sq else [torch.dot(xf, xf), zero]
                continue
            if subtract:
                y.sub_(x)
            xf, yf = _flat_pair(x, y)
            per_pair[i] = ([torch.dot(xf, xf), torch.dot(yf, yf), torch.dot(xf, yf)] if y_sq
                           else [torch.dot(xf, xf), torch.dot(xf, yf)])
        return torch.stack([v for sums in per_pair for v in sums]).view(len(xs), -1).T
    if subtract:
        torch._foreach_sub_([y for y in ys if y is not None], [x for x, y in zip(xs, ys) if y is not None])
    rows = [_sq_norms(xs)]
    if y_sq:
        rows.append(_sq_norms([y if y is not None else x.new_zeros(()) for x, y in zip(xs, ys)]))
    rows.append(_dots(xs, ys))
    return torch.stack(rows)


class StepMeasurer:
    """Measures Δ_t, ‖w_t‖ and the unit-gradient statistic for a fixed list of tensors.

    ``slices`` partition the tracked tensors by param group. ``reduce_fn`` sums a stacked
    ``[K, N]`` tensor of partial sums across shards (identity when nothing is sharded).

    Every quantity is a linear combination of per-tensor sums taken after the step, when the
    update's source (momentum buffer, gradient or ``w_t − w_{t+1}``) and ``w_{t+1}`` are read
    once each, together; before the step only the gradient statistics (one sample in
    ``unit_grad_every``) and the snapshot copy are taken.
    """

    def __init__(self, slices: list[GroupSlice], reduce_fn: ReduceFn | None = None) -> None:
        self.slices = slices
        self.reduce_fn = reduce_fn
        self._pre: list[Tensor] | None = None
        self._missing: tuple[bool, ...] | None = None  # per active column: no gradient this step
        self._mask_cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._per_unit = True

    def before_step(self, optimizer: torch.optim.Optimizer | None = None,
                    grad_scale: Tensor | float | None = None, unit_grad: bool = True,
                    per_unit: bool = True) -> list[GroupSlice]:
        """Record what ``g_t`` (and, for snapshot groups, ``w_t``) contribute; call with final
        gradients, before the step.

        Only the slices of ``optimizer`` (all when ``None``) take part; they are returned.
        ``grad_scale``: the factor the gradients are still multiplied by (a fused optimizer under
        a GradScaler unscales inside its step); gradient statistics are divided by it.
        ``unit_grad=False`` skips the gradient statistics (their row of the result is NaN, which
        :class:`~lightning_smd.estimates.RunningMean` skips): then nothing is read before the step
        in buffer and grad mode, and only the snapshot is copied in snapshot mode.
        ``per_unit=False``: this step, no unit columns even for slices with ``units``.
        """
        self._per_unit = per_unit
        pre = []
        missing: list[bool] = []
        for s in self.slices:
            if optimizer is not None and s.optimizer is not optimizer:
                continue
            # torch's optimizers skip a tensor without gradient: no decay, no momentum, no move
            missing.extend(p.grad is None for p in s.params)
            group = s.group
            s.lr = float(group["lr"])
            s.weight_decay = float(group.get("weight_decay", 0.0))
            s.momentum = float(group.get("momentum", 0.0) or 0.0)
            s.dampening = float(group.get("dampening", 0.0) or 0.0)
            device = s.params[0].device
            if not unit_grad:
                sums = s._not_sampled
                if sums is None:
                    sums = s._not_sampled = torch.full((2, len(s.params) + s.n_units), math.nan, device=device)
                sums = sums[:, :len(s.params) + self._n_units(s)]
            elif self._units(s) is not None:
                if s.mode == "buffer":
                    sums = _tensor_and_unit_sums(s, s.grads(), [local(b) if b is not None else None for b in s.buffers()], "xd")
                else:
                    g_sq = _tensor_and_unit_sums(s, s.grads(), [None] * len(s.params), "x")[0]
                    sums = torch.stack([g_sq, torch.zeros_like(g_sq)])
            elif s.mode == "buffer":
                sums = _pair_sums(s.grads(), [local(b) if b is not None else None for b in s.buffers()], y_sq=False)
            else:
                g_sq = _sq_norms(s.grads())
                sums = torch.stack([g_sq, torch.zeros_like(g_sq)])
            if grad_scale is not None:
                scale = torch.as_tensor(grad_scale, dtype=torch.float32, device=device)
                sums = sums / torch.stack([scale * scale, scale]).reshape(2, 1)
            if s.mode == "snapshot":
                weights = [local(p.detach()) for p in s.params]
                if s.snapshot is None:
                    s.snapshot = [torch.empty_like(w) for w in weights]
                torch._foreach_copy_(s.snapshot, weights)
            pre.append(sums)
        self._pre = pre
        self._active = [s for s in self.slices if optimizer is None or s.optimizer is optimizer]
        self._missing = tuple(missing) if any(missing) else None
        return self._active

    def after_step(self) -> tuple[Tensor, list[GroupSlice]]:
        """Finish the measurement once the optimizer stepped.

        Returns ``(stats, slices)``: ``stats`` is a ``[3, n + m]`` float32 device tensor with rows
        Δ_t (rad), ‖w_t‖ and the unit-gradient sample (‖g‖²‖w‖², or h̃ for momentum), over the
        ``n`` tensors of the slices that stepped, in their order, followed by the ``m`` invariance
        units of those with ``units`` (tensor by tensor; ``m = 0`` without per-unit statistics).
        """
        if self._pre is None:
            raise RuntimeError("after_step() called without before_step()")
        sums = []
        for s, pre in zip(self._active, self._pre):
            weights = [local(p.detach()) for p in s.params]
            if s.mode == "buffer":
                source = [local(b) if b is not None else None for b in s.buffers()]
            elif s.mode == "grad":
                source = s.grads()
            else:  # snapshot := w_t − w_{t+1} = −u
                source = s.snapshot
            if self._units(s) is not None:
                after = _tensor_and_unit_sums(s, weights, source, "xyd", subtract=s.mode == "snapshot", last_first=True)
            else:
                after = _pair_sums(weights, source, subtract=s.mode == "snapshot", last_first=True)
            sums.append(torch.cat([pre, after]))
        # [5, n + m]: ‖g‖², ⟨g, b_{t−1}⟩, ‖w_{t+1}‖², ‖src‖², ⟨w_{t+1}, src⟩; per slice its tensor
        # columns then its unit columns; reordered to all tensor columns, then all unit columns
        stacked = torch.cat(sums, dim=1)
        if any(self._units(s) is not None for s in self._active):
            stacked = stacked[:, self._column_order(stacked.device)]
        if self.reduce_fn is not None:
            stacked = self.reduce_fn(stacked)
        stats = self._combine(stacked)
        self._pre = None
        return stats, self._active

    def _units(self, s: GroupSlice) -> list[int] | None:
        """The units of ``s`` measured this step (``None``: its tensors only)."""
        return s.units if self._per_unit else None

    def _n_units(self, s: GroupSlice) -> int:
        return s.n_units if self._per_unit else 0

    def _column_order(self, device: torch.device) -> Tensor:
        """Device index taking the per-slice ``[tensors, units]`` columns to ``[all tensors, all units]`` (cached)."""
        key = (device, tuple((len(s.params), self._n_units(s)) for s in self._active))
        cached = getattr(self, "_order_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        tensor_cols, unit_cols, at = [], [], 0
        for n, m in key[1]:
            tensor_cols.extend(range(at, at + n))
            unit_cols.extend(range(at + n, at + n + m))
            at += n + m
        order = torch.tensor(tensor_cols + unit_cols).to(device)
        self._order_cache = (key, order)
        return order

    def _columns(self) -> list[tuple[GroupSlice, int]]:
        """``(slice, index in the slice)`` of every statistics column: tensors, then units."""
        cols = [(s, i) for s in self._active for i in range(len(s.params))]
        cols += [(s, i) for s in self._active if self._units(s) is not None for i, k in enumerate(s.units) for _ in range(k)]
        return cols

    def _coefficients(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``[5, n]`` per-tensor (η, λ, μ, τ, mode code); cached while the hyper-parameters repeat,
        so a constant-LR stretch builds (and copies to the device) one tensor, not one per step."""
        key = (dtype, device, tuple((s.lr, s.weight_decay, s.momentum, s.dampening, s.mode, len(s.params),
                                     tuple(self._units(s) or ())) for s in self._active))
        cached = getattr(self, "_coef_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        rows = [[s.lr, s.weight_decay, s.momentum, s.dampening, _MODE_CODE[s.mode]] for s, _ in self._columns()]
        coefficients = torch.tensor(rows, dtype=dtype).to(device, non_blocking=True).T
        self._coef_cache = (key, coefficients)
        return coefficients

    def _combine(self, sums: Tensor) -> Tensor:
        g_sq, vg, a, d, e = sums  # a = ‖w_{t+1}‖², d = ‖src‖², e = ⟨w_{t+1}, src⟩
        lr, wd, momentum, dampening, mode = self._coefficients(sums.dtype, sums.device)
        modes = {s.mode for s in self._active}
        per_mode = {}  # mode → (‖w_t‖², ‖u‖², ⟨w_t, u⟩)
        if "buffer" in modes:
            # u = −η·b and w_t = w_{t+1} + η·b
            wb = e + lr * d
            per_mode["buffer"] = (a + lr * (e + wb), lr * lr * d, -lr * wb)
        if "grad" in modes:
            # u = −η(g + λ w_t) and w_t = (w_{t+1} + ηg) / (1 − ηλ)
            shrink = 1.0 - lr * wd
            w_sq = (a + lr * (2.0 * e + lr * d)) / (shrink * shrink)
            gw = (e + lr * d) / shrink
            per_mode["grad"] = (w_sq, lr * lr * (d + 2.0 * wd * gw + wd * wd * w_sq), -lr * (gw + wd * w_sq))
        if "snapshot" in modes:
            # s = w_t − w_{t+1} = −u, w_t = w_{t+1} + s
            per_mode["snapshot"] = (a + 2.0 * e + d, d, -e - d)
        if len(per_mode) == 1:
            (w_sq, u_sq, wu), = per_mode.values()
        else:
            w_sq, u_sq, wu = per_mode.get("snapshot", (a, d, d))
            for name in ("grad", "buffer"):
                if name in per_mode:
                    selected = mode == _MODE_CODE[name]
                    w_sq, u_sq, wu = (torch.where(selected, new, old) for new, old in zip(per_mode[name], (w_sq, u_sq, wu)))
        delta = _angle(w_sq, u_sq, wu)
        # h_t = ‖g‖² + 2α⟨v_{t−1}, g⟩ with torch's dampened buffer rescaled to SMD's v
        h = g_sq + 2.0 * momentum * vg / (1.0 - dampening) if "buffer" in modes else g_sq
        unit_grad_sq = h * w_sq
        w_norm = w_sq.sqrt()
        if self._missing is not None:
            # No gradient: the optimizer skipped the tensor. Its buffer (and the gradient-mode
            # reconstruction) would describe an update that did not happen: Δ = 0, ‖w_t‖ = ‖w_{t+1}‖
            # (a snapshot measured what happened anyway), and no unit-gradient sample.
            unmoved, unsampled = self._masks(sums.device)
            delta = torch.where(unmoved, torch.zeros_like(delta), delta)
            w_norm = torch.where(unmoved, a.sqrt(), w_norm)
            unit_grad_sq = torch.where(unsampled, torch.full_like(unit_grad_sq, math.nan), unit_grad_sq)
        return torch.stack([delta, w_norm, unit_grad_sq])

    def _masks(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Device masks (not measured by a snapshot, no gradient) of the columns without gradient;
        cached per pattern, so a branch used every other step builds two, not one per step."""
        key = (device, self._missing, tuple((s.mode, tuple(self._units(s) or ())) for s in self._active))
        cache = self._mask_cache
        if key not in cache:
            starts, at = {}, 0  # each slice's first tensor column (self._missing is over tensors)
            for s in self._active:
                starts[id(s)], at = at, at + len(s.params)
            missing = [self._missing[starts[id(s)] + i] for s, i in self._columns()]
            unmoved = [m and s.mode != "snapshot" for m, (s, _) in zip(missing, self._columns())]
            cache[key] = (torch.tensor(unmoved, device=device), torch.tensor(missing, device=device))
        return cache[key]


_MODE_CODE = {"buffer": 0.0, "grad": 1.0, "snapshot": 2.0}
