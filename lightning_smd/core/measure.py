"""Per-step SMD statistics computed on device: angular update Δ_t, ‖w_t‖ and the unit-gradient L.

One measured optimizer step is two calls: :meth:`StepMeasurer.before_step` (gradients final,
weights still ``w_t``) and :meth:`StepMeasurer.after_step` (weights now ``w_{t+1}``). They compute
*partial sums* (squared norms and dot products) per row; the sums are stacked into one ``[5, N]``
tensor, reduced across shards once (``reduce_fn``), and only then combined non-linearly. Nothing is
moved to the host here.

**No copy of the weights.** Every supported optimizer applies ``w_{t+1} = ρ·w_t − κ·s`` with a
*source* ``s`` that can be read, or rebuilt elementwise from the optimizer's own state, after the
step. Then ``w_t = (w_{t+1} + κs)/ρ`` and ``u = ((ρ−1)·w_{t+1} − κs)/ρ``, and ‖w_t‖², ‖u‖², ⟨w_t, u⟩
are linear in three sums taken after the step: ‖w_{t+1}‖², ‖s‖², ⟨w_{t+1}, s⟩. The *mode* of a
param group says where ``s`` comes from (:func:`measurement_mode`):

* ``"buffer"`` — ``torch.optim.SGD`` with heavy-ball momentum: ``s`` = the momentum buffer, ρ = 1, κ = η.
* ``"grad"`` — SGD without momentum: ``s = g``, ρ = 1 − ηλ, κ = η.
* ``"nesterov"`` — SGD with ``nesterov=True``: ``s = g + μ·buf`` (formed after the step), ρ = 1 − ηλ, κ = η.
* ``"adam"`` — ``torch.optim.Adam``/``AdamW`` (foreach or single-tensor, not fused): ``s = m/(√v̂ + ε√b₂)``
  with ``v̂`` = ``exp_avg_sq`` (``max_exp_avg_sq`` under AMSGrad), ρ = 1 − ηλ (decoupled) or 1,
  κ = η√b₂/b₁ with the bias corrections ``b = 1 − β^t`` of each tensor's own step count.
* ``"lion"`` — ``lion_pytorch.Lion`` (not triton): ``s = sign(c)`` with ``c`` rebuilt from the new
  moment and the gradient (``m_{t} = (m_{t+1} − (1−β₂)g)/β₂``), ρ = 1 − ηλ, κ = η.
* ``"snapshot"`` — anything else (``torch.optim.Muon``, whose Newton–Schulz update cannot be
  rebuilt cheaply; fused kernels; 16-bit parameters; unknown optimizers): ``w_t`` is copied before
  the step into a *transient* buffer freed after it, and ``s = w_t − w_{t+1}`` (ρ = κ = 1).

The sources formed after the step (Nesterov, Adam, Lion) are transient too: nothing the size of
the tracked tensors is held between steps.

**One fused pass.** All sums are taken per row of a tensor viewed in memory order as
``[rows, numel/rows]``: one row per invariance unit when its per-unit statistics are taken this step
(a row-wise ``vector_norm`` for squared norms, ``linalg.vecdot`` for dots), else one row (a BLAS
``dot``, the cheapest read on CPU). The per-tensor sums and the per-unit sums are sums of the row
sums (one ``index_add_`` each): per-channel statistics need no second read. Small tensors (under
:data:`SMALL_NUMEL` elements) of the same trailing shape, dtype, strides and device are
concatenated along dim 0 and reduced together per output channel, so a model of thousands of small
tensors costs a handful of kernel launches, not thousands; large tensors are reduced where they lie
(one launch streams ≥ 256 KiB; the loop over them does not show). The layout of that pass is
planned once per set of shapes and cached. All rows go to the host in the step's one transfer.

Δ_t uses the stable form ``atan2(‖u_⊥‖, ‖w_t‖ + ⟨ŵ_t, u⟩)``, never ``acos`` of a cosine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from lightning_smd.core.theory import effective_weight_decay

__all__ = ["GroupSlice", "SMALL_NUMEL", "Sources", "StepMeasurer", "angular_update", "local", "measurement_mode", "row_sums"]

ReduceFn = Callable[[Tensor], Tensor]

#: tensors with fewer elements are concatenated with others of the same trailing shape and reduced together
SMALL_NUMEL = 1 << 16


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


def _is_lion(optimizer: torch.optim.Optimizer) -> bool:
    if type(optimizer).__name__ != "Lion" or not type(optimizer).__module__.startswith("lion_pytorch"):
        return False
    try:
        from lion_pytorch.lion_pytorch import update_fn
    except ImportError:
        return False
    return getattr(optimizer, "update_fn", None) is update_fn  # not the triton kernel


def measurement_mode(optimizer: torch.optim.Optimizer, group: dict) -> str:
    """How this group's update is recovered after the step: ``"buffer"``, ``"grad"``, ``"nesterov"``,
    ``"adam"``, ``"lion"`` (exactly, from the optimizer's state) or ``"snapshot"`` (a transient copy)."""
    kind = type(optimizer)
    if kind is torch.optim.SGD:
        if group.get("maximize", False):
            return "snapshot"
        if group.get("nesterov", False):
            return "nesterov"
        return "buffer" if group.get("momentum", 0.0) != 0 else "grad"
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        plain = not (group.get("fused") or group.get("capturable") or group.get("differentiable"))
        return "adam" if plain else "snapshot"
    if _is_lion(optimizer) and group.get("betas", (0.9, 0.99))[1] > 0:
        return "lion"
    return "snapshot"


@dataclass
class GroupSlice:
    """The tracked tensors of one optimizer param group: positions ``[start, start+len(params))``."""

    optimizer: torch.optim.Optimizer
    group_index: int
    params: list[Tensor]
    start: int
    mode: str
    #: snapshot mode only, between ``before_step`` and ``after_step``: the transient copy of ``w_t``
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
    #: sharded tensors (see :mod:`lightning_smd.core.shards`): per tensor, the global unit of each row
    #: of dim 0 of its local part (``None``: a plain tensor, whose rows are the whole tensor's)
    unit_rows: list[list[int] | None] | None = None
    _zeros: dict[int, Tensor] = field(default_factory=dict)
    _not_sampled: Tensor | None = None  # the NaN rows of a step that does not sample L (never mutated)

    @property
    def n_units(self) -> int:
        """How many unit columns this slice adds to the statistics (0 without per-unit statistics)."""
        return sum(self.units) if self.units is not None else 0

    @property
    def group(self) -> dict:
        return self.optimizer.param_groups[self.group_index]

    @property
    def stop(self) -> int:
        return self.start + len(self.params)

    @property
    def _distributed(self) -> bool:
        """Whether the tensors are DTensors (whose local shards must be taken); cached."""
        known = self.__dict__.get("_dtensor")
        if known is None:
            known = self.__dict__["_dtensor"] = any(hasattr(p, "to_local") for p in self.params)
        return known

    def weights(self) -> list[Tensor]:
        """The local weights (callers run under ``torch.no_grad``: no autograd graph is built)."""
        return [local(p) for p in self.params] if self._distributed else list(self.params)

    def grads(self) -> list[Tensor]:
        """Local gradients; a tensor that got no gradient this step counts as zero."""
        out = [p.grad for p in self.params]
        if any(g is None for g in out):
            for i, p in enumerate(self.params):
                if out[i] is None:
                    g = self._zeros.get(i)
                    if g is None:
                        g = self._zeros[i] = torch.zeros_like(local(p))
                    out[i] = g
        return [local(g) for g in out] if self._distributed else out

    def grads_or_none(self) -> list[Tensor | None]:
        if not self._distributed:
            return [p.grad for p in self.params]
        return [local(p.grad) if p.grad is not None else None for p in self.params]

    def state_tensors(self, key: str) -> list[Tensor | None]:
        state = self.optimizer.state
        out = [st.get(key) if (st := state.get(p)) else None for p in self.params]
        return [local(t) if t is not None else None for t in out] if self._distributed else out

    def buffers(self) -> list[Tensor | None]:
        return self.state_tensors("momentum_buffer")

    # ------------------------------------------------------------------ the update's source
    def coefficients(self) -> tuple[list[float], list[float]]:
        """Per tensor ``(ρ − 1, κ)`` of ``w_{t+1} = ρ·w_t − κ·s`` for this step (hyper-parameters as
        read before it; Adam's bias corrections from each tensor's step count after it)."""
        n, lr, wd = len(self.params), self.lr, self.weight_decay
        if self.mode == "buffer":
            return [0.0] * n, [lr] * n
        if self.mode == "snapshot":
            return [0.0] * n, [1.0] * n
        if self.mode == "adam":
            decay = -lr * wd if self.group.get("decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW)) else 0.0
            beta1, beta2 = (float(b) for b in self.group["betas"])
            kappas = []
            for t in self._steps():
                bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
                kappas.append(lr * math.sqrt(bc2) / bc1 if t > 0 else 0.0)
            return [decay] * n, kappas
        if self.mode == "lion":
            wd_eff = effective_weight_decay(self.optimizer, self.group, lr, wd)  # decays tied to η (timm, lion-pytorch)
            return [-lr * wd_eff] * n, [lr] * n
        return [-lr * wd] * n, [lr] * n  # grad, nesterov

    def _steps(self) -> list[float]:
        steps = self.state_tensors("step")
        present = [s for s in steps if s is not None]
        values = torch.stack([s.reshape(()).float() for s in present]).tolist() if present else []
        it = iter(values)
        return [next(it) if s is not None else 0.0 for s in steps]

    def source(self) -> "Sources":
        """After the step: the source ``s`` of every tensor, formed lazily per reduction (a whole
        bucket of small tensors at once, see :class:`Sources`)."""
        n = len(self.params)
        if self.mode in ("buffer", "grad", "snapshot"):
            direct = {"buffer": self.buffers, "grad": self.grads, "snapshot": lambda: self.snapshot}[self.mode]()
            return Sources([direct], _first, [None] * n)
        if self.mode == "nesterov":
            momentum = self.momentum
            return Sources([self.grads_or_none(), self.buffers()], lambda g, b, _: torch.add(g, b, alpha=momentum),
                           [None] * n)
        if self.mode == "lion":
            beta1, beta2 = (float(b) for b in self.group["betas"])
            # c = β1·m_t + (1−β1)·g with m_t = (m_{t+1} − (1−β2)·g)/β2
            alpha, beta = beta1 / beta2, (1.0 - beta1) - beta1 * (1.0 - beta2) / beta2
            return Sources([self.state_tensors("exp_avg"), self.grads_or_none()],
                           lambda m, g, _: torch.mul(m, alpha).add_(g, alpha=beta).sign_(), [None] * n)
        # adam: m / (√v + ε·√b₂)
        beta2 = float(self.group["betas"][1])
        eps = float(self.group["eps"])
        second = self.state_tensors("max_exp_avg_sq" if self.group.get("amsgrad", False) else "exp_avg_sq")
        eps_t = [eps * math.sqrt(max(1.0 - beta2 ** t, 0.0)) for t in self._steps()]
        return Sources([self.state_tensors("exp_avg"), second], lambda m, v, e: m / v.sqrt().add_(e), eps_t)


def _first(x: Tensor, *_) -> Tensor:
    return x


class Sources:
    """The update's source of a list of tensors, formed only when a reduction needs it.

    ``inputs[k][i]``: the k-th input of tensor ``i`` (``None``: no state; for the first input, the
    tensor did not move); ``fn(*inputs, scalar)`` forms the source elementwise, ``scalars[i]`` a
    per-tensor constant. A bucket of small tensors is formed from the concatenated inputs in one
    call (one kernel per input instead of one per tensor), a large tensor on its own, so the
    transient never exceeds one bucket's or one tensor's size."""

    def __init__(self, inputs: list[list[Tensor | None]], fn: Callable, scalars: list) -> None:
        self.inputs, self.fn, self.scalars = inputs, fn, scalars

    @staticmethod
    def concat(parts: list["Sources"]) -> "Sources":
        return parts[0] if len(parts) == 1 else _Joined(parts)

    def one(self, i: int) -> Tensor | None:
        args = [inp[i] for inp in self.inputs]
        if args[0] is None:
            return None
        if self.fn is _first:
            return args[0]
        args = [a if a is not None else torch.zeros_like(args[0]) for a in args]
        return self.fn(*args, self.scalars[i])

    def many(self, idx: list[int], like: Sequence[Tensor]) -> Tensor | None:
        """The sources of tensors ``idx`` concatenated along dim 0 (``like``: their weights)."""
        if all(self.inputs[0][i] is None for i in idx):
            return None
        scalars = {self.scalars[i] for i in idx}
        if len(scalars) > 1:  # e.g. Adam tensors at different step counts: form each, then concatenate
            return torch.cat([y if (y := self.one(i)) is not None else torch.zeros_like(w) for i, w in zip(idx, like)])
        cat = [torch.cat([inp[i] if inp[i] is not None else torch.zeros_like(w) for i, w in zip(idx, like)])
               for inp in self.inputs]
        return self.fn(*cat, scalars.pop())


class _Joined(Sources):
    """Several slices' sources, indexed as one list."""

    def __init__(self, parts: list[Sources]) -> None:
        self.parts = parts
        self.where = [(p, i) for p in parts for i in range(len(p.inputs[0]))]

    def one(self, i: int) -> Tensor | None:
        part, j = self.where[i]
        return part.one(j)

    def many(self, idx: list[int], like: Sequence[Tensor]) -> Tensor | None:
        if len({id(self.where[i][0]) for i in idx}) == 1:
            return self.where[idx[0]][0].many([self.where[i][1] for i in idx], like)
        return torch.cat([y if (y := self.one(i)) is not None else torch.zeros_like(w) for i, w in zip(idx, like)])


# ---------------------------------------------------------------------------- the fused row pass
def _rows_of(x: Tensor, units: int, shared: bool) -> int:
    """Rows a tensor is reduced in: its ``units`` (1: the whole tensor, one ``dot``), or one per
    output channel (dim 0) when it is reduced together with others of its trailing shape."""
    if shared:
        return x.shape[0]
    return units


def _row_blocks(unit_rows: list[int]) -> int:
    """Rows a shard is reduced in so that each lies within one unit: its local rows of dim 0 in
    equal blocks, as few as the runs of equal units allow (1 for an empty shard)."""
    if not unit_rows:
        return 1
    block, run = 0, 1
    for a, b in zip(unit_rows, unit_rows[1:]):
        if a == b:
            run += 1
        else:
            block, run = math.gcd(block, run), 1
    return len(unit_rows) // math.gcd(block, run)


def _rows_pair(x: Tensor, y: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """``x`` and ``y`` as ``[rows, numel/rows]``, row ``j`` holding ``x[j·C/rows:(j+1)·C/rows]``
    (``C = x.shape[0]``), with the same element order in both; views for contiguous and
    ``channels_last`` tensors (dim 0 outermost in memory), a copy otherwise."""
    if x.is_contiguous() and y.is_contiguous():
        return x.view(rows, -1), y.view(rows, -1)
    if x.shape == y.shape and x.stride() == y.stride():
        order = sorted(range(x.dim()), key=lambda i: (-x.stride(i), -x.shape[i]))
        xp, yp = x.permute(order), y.permute(order)
        if order[0] == 0 and xp.is_contiguous() and yp.is_contiguous():
            return xp.view(rows, -1), yp.view(rows, -1)
    return x.reshape(rows, -1), y.reshape(rows, -1)


@dataclass
class RowPlan:
    """How one list of tensors is reduced per row: which tensors go together (``buckets``, in the
    order their rows come out) and each tensor's row count."""

    rows: list[int]
    buckets: list[list[int]]

    @classmethod
    def build(cls, xs: Sequence[Tensor], units: Sequence[int]) -> "RowPlan":
        """``units[i]``: the rows tensor ``i`` needs at least (its invariance units this step, 1 for
        per-tensor sums only); small tensors sharing a bucket are reduced per output channel."""
        buckets: list[list[int]] = []
        shared: dict[tuple, list[int]] = {}
        for i, x in enumerate(xs):
            if x.numel() >= SMALL_NUMEL or x.dim() < 2 or x.shape[0] == 0:
                buckets.append([i])
                continue
            key = (x.device, x.dtype, tuple(x.shape[1:]), x.stride())
            if key not in shared:
                shared[key] = []
                buckets.append(shared[key])
            shared[key].append(i)
        in_shared = {i for b in buckets if len(b) > 1 for i in b}
        rows = [_rows_of(x, k, i in in_shared) for i, (x, k) in enumerate(zip(xs, units))]
        return cls(rows, buckets)

    def row_tensor(self) -> list[int]:
        """The tensor each output row belongs to (in output order)."""
        return [i for b in self.buckets for i in b for _ in range(self.rows[i])]

    def row_in_tensor(self) -> list[int]:
        return [r for b in self.buckets for i in b for r in range(self.rows[i])]


def row_sums(xs: Sequence[Tensor], ys: "Sequence[Tensor | None] | Sources", want: str, plan: RowPlan) -> Tensor:
    """``[len(want), rows]`` per-row sums, rows in ``plan``'s order: ``"x"`` ‖x‖², ``"y"`` ‖y‖²,
    ``"d"`` ⟨x, y⟩ (a missing ``y`` counts as zero). Accumulated in fp32 (float64 if any input is).
    ``ys`` may be a :class:`Sources`: each bucket's partners are then formed when it is reduced."""
    if not isinstance(ys, Sources):
        ys = Sources([list(ys)], _first, [None] * len(xs))
    acc = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    out = []
    device = xs[0].device if xs else torch.device("cpu")
    for bucket in plan.buckets:
        if len(bucket) == 1:
            i = bucket[0]
            x, y, rows = xs[i], ys.one(i), plan.rows[i]
        else:
            x = torch.cat([xs[i] for i in bucket])
            y = ys.many(bucket, [xs[i] for i in bucket])
            rows = sum(plan.rows[i] for i in bucket)
        rx, ry = _rows_pair(x, y if y is not None else x, rows)
        parts = []
        for kind in want:
            if kind == "x":
                parts.append(torch.linalg.vector_norm(rx, dim=1, dtype=acc).square())
            elif y is None:
                parts.append(torch.zeros(rows, dtype=acc, device=x.device))
            elif kind == "y":
                parts.append(torch.linalg.vector_norm(ry, dim=1, dtype=acc).square())
            elif rows == 1:  # one BLAS dot streams at the memory bandwidth; a row vecdot takes ~1.7x as long
                parts.append(torch.dot(rx[0].to(acc), ry[0].to(acc)).reshape(1))
            else:
                parts.append(torch.linalg.vecdot(rx.to(acc), ry.to(acc)))
        block = torch.stack(parts)
        out.append(block if block.device == device else block.to(device))
    if not out:
        return torch.zeros(len(want), 0, dtype=acc, device=device)
    return torch.cat(out, dim=1)


@dataclass
class _Layout:
    """The cached layout of one set of active slices: the row plan and the row → column maps."""

    plan: RowPlan
    n: int  # tensor columns
    m: int  # unit columns
    tensor_index: Tensor  # [rows] → tensor column
    unit_index: Tensor | None  # [rows] → n + unit column (n + m: a dropped column), None without units


class StepMeasurer:
    """Measures Δ_t, ‖w_t‖ and the unit-gradient statistic for a fixed list of tensors.

    ``slices`` partition the tracked tensors by param group. ``reduce_fn`` sums a stacked
    ``[K, N]`` tensor of partial sums across shards (identity when nothing is sharded).

    Per measured step: before the step, the unit-gradient row sums (one sample in
    ``unit_grad_every``) and, in snapshot mode only, a transient copy of ``w_t``; after the step,
    one fused row pass over ``w_{t+1}`` and the update's source. Nothing is kept between steps but
    small index and coefficient tensors.
    """

    def __init__(self, slices: list[GroupSlice], reduce_fn: ReduceFn | None = None) -> None:
        self.slices = slices
        self.reduce_fn = reduce_fn
        self._pre: Tensor | None = None
        self._missing: tuple[bool, ...] | None = None  # per active tensor column: no gradient this step
        self._mask_cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._layouts: dict[tuple, _Layout] = {}
        self._nan: dict[tuple, Tensor] = {}
        self._per_unit = True
        self._active: list[GroupSlice] = []

    @torch.no_grad()
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
        but the snapshot copy of snapshot-mode groups.
        ``per_unit=False``: this step, no unit columns even for slices with ``units``.
        """
        self._per_unit = per_unit
        self._active = [s for s in self.slices if optimizer is None or s.optimizer is optimizer]
        missing: list[bool] = []
        weights: list[Tensor] = []
        for s in self._active:
            # torch's optimizers skip a tensor without gradient: no decay, no momentum, no move
            missing.extend(p.grad is None for p in s.params)
            group = s.group
            s.lr = float(group["lr"])
            s.weight_decay = float(group.get("weight_decay", 0.0))
            s.momentum = float(group.get("momentum", 0.0) or 0.0)
            s.dampening = float(group.get("dampening", 0.0) or 0.0)
            w = s.weights()
            if s.mode == "snapshot":
                s.snapshot = torch._foreach_mul(w, 1.0)  # transient: freed in after_step
            weights.extend(w)
        self._missing = tuple(missing) if any(missing) else None
        layout = self._layout(weights)
        if not unit_grad:
            device = weights[0].device if weights else torch.device("cpu")
            key = (sum(layout.plan.rows), device)
            pre = self._nan.get(key)
            if pre is None:
                pre = self._nan[key] = torch.full((2, key[0]), math.nan, device=device)
            self._pre = pre
            return self._active
        grads, partners = [], []
        for s in self._active:
            grads.extend(s.grads())
            partners.extend(s.buffers() if s.mode == "buffer" else [None] * len(s.params))
        pre = row_sums(grads, partners, "xd", layout.plan)
        if grad_scale is not None:
            scale = torch.as_tensor(grad_scale, dtype=pre.dtype, device=pre.device)
            pre = pre / torch.stack([scale * scale, scale]).reshape(2, 1)
        self._pre = pre
        return self._active

    @torch.no_grad()
    def after_step(self) -> tuple[Tensor, list[GroupSlice]]:
        """Finish the measurement once the optimizer stepped.

        Returns ``(stats, slices)``: ``stats`` is a ``[3, n + m]`` float32 device tensor with rows
        Δ_t (rad), ‖w_t‖ and the unit-gradient sample (‖g‖²‖w‖², or h̃ for momentum), over the
        ``n`` tensors of the slices that stepped, in their order, followed by the ``m`` invariance
        units of those with ``units`` (tensor by tensor; ``m = 0`` without per-unit statistics).
        """
        if self._pre is None:
            raise RuntimeError("after_step() called without before_step()")
        weights: list[Tensor] = []
        parts: list[Sources] = []
        for s in self._active:
            w = s.weights()
            if s.mode == "snapshot":
                torch._foreach_sub_(s.snapshot, w)  # w_t − w_{t+1} = −u
            weights.extend(w)
            parts.append(s.source())
        layout = self._layout(weights)
        sources = Sources.concat(parts)
        rows = row_sums(weights, sources, "xyd", layout.plan)
        del sources
        for s in self._active:
            s.snapshot = None  # the transient copy goes now
        # [5, rows]: ‖g‖², ⟨g, b_{t−1}⟩, ‖w_{t+1}‖², ‖s‖², ⟨w_{t+1}, s⟩ → [5, n + m] columns
        rows = torch.cat([self._pre.to(rows.dtype), rows])
        stacked = rows.new_zeros(5, layout.n + layout.m + 1)
        stacked.index_add_(1, layout.tensor_index, rows)
        if layout.unit_index is not None:
            stacked.index_add_(1, layout.unit_index, rows)
        stacked = stacked[:, :layout.n + layout.m]
        if self.reduce_fn is not None:
            stacked = self.reduce_fn(stacked)
        stats = self._combine(stacked)
        self._pre = None
        return stats, self._active

    def _units(self, s: GroupSlice) -> list[int] | None:
        """The units of ``s`` measured this step (``None``: its tensors only)."""
        return s.units if self._per_unit else None

    def _layout(self, weights: list[Tensor]) -> _Layout:
        key = (tuple(id(s) for s in self._active), self._per_unit, tuple(w.shape for w in weights))
        layout = self._layouts.get(key)
        if layout is not None:
            return layout
        units: list[int] = []
        unit_rows: list[list[int] | None] = []  # sharded: the global unit of each local row
        for s in self._active:
            units.extend(self._units(s) or [1] * len(s.params))
            unit_rows.extend(s.unit_rows if s.unit_rows is not None and self._units(s) is not None else [None] * len(s.params))
        plan = RowPlan.build(weights, [k if r is None else _row_blocks(r) for k, r in zip(units, unit_rows)])
        n = len(weights)
        unit_start, m = [], 0
        for s in self._active:
            for k in (self._units(s) or [None] * len(s.params)):
                unit_start.append(None if k is None else m)
                m += k or 0
        row_tensor, row_in = plan.row_tensor(), plan.row_in_tensor()
        unit_cols = []
        for i, r in zip(row_tensor, row_in):
            start, rows = unit_start[i], unit_rows[i]
            if start is None or (rows is not None and not rows):  # no units, or an empty shard
                unit_cols.append(n + m)
            elif rows is not None:  # a shard: its row's global unit (the all-reduce adds the other shards)
                unit_cols.append(n + start + rows[r * (len(rows) // plan.rows[i])])
            else:
                unit_cols.append(n + start + r // (plan.rows[i] // units[i]))
        device = weights[0].device if weights else torch.device("cpu")
        layout = _Layout(plan, n, m, torch.tensor(row_tensor, dtype=torch.long).to(device),
                         torch.tensor(unit_cols, dtype=torch.long).to(device) if m else None)
        if len(self._layouts) > 16:
            self._layouts.clear()
        self._layouts[key] = layout
        return layout

    def _columns(self) -> list[tuple[GroupSlice, int]]:
        """``(slice, index in the slice)`` of every statistics column: tensors, then units."""
        cols = [(s, i) for s in self._active for i in range(len(s.params))]
        cols += [(s, i) for s in self._active if self._units(s) is not None for i, k in enumerate(s.units) for _ in range(k)]
        return cols

    def _coefficients(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``[3, n + m]`` per column (ρ − 1, κ, the momentum factor of h); cached while they repeat,
        so a constant-LR stretch builds (and copies to the device) one tensor, not one per step."""
        per_slice = []
        for s in self._active:
            decay, kappa = s.coefficients()
            h = 2.0 * s.momentum / (1.0 - s.dampening) if s.mode == "buffer" and s.dampening != 1.0 else 0.0
            per_slice.append((tuple(decay), tuple(kappa), h, tuple(self._units(s) or ())))
        key = (dtype, device, tuple(per_slice))
        cached = getattr(self, "_coef_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        decay_col, kappa_col, h_col = [], [], []
        for decay, kappa, h, _ in per_slice:
            decay_col.extend(decay)
            kappa_col.extend(kappa)
            h_col.extend([h] * len(decay))
        for decay, kappa, h, units in per_slice:
            for d, k, u in zip(decay, kappa, units):
                decay_col.extend([d] * u)
                kappa_col.extend([k] * u)
                h_col.extend([h] * u)
        coefficients = torch.tensor([decay_col, kappa_col, h_col], dtype=torch.float64).to(dtype).to(device, non_blocking=True)
        self._coef_cache = (key, coefficients)
        return coefficients

    def _combine(self, sums: Tensor) -> Tensor:
        g_sq, vg, a, d, e = sums  # a = ‖w_{t+1}‖², d = ‖s‖², e = ⟨w_{t+1}, s⟩
        decay, kappa, h_factor = self._coefficients(sums.dtype, sums.device)
        # w_{t+1} = ρ·w_t − κ·s: w_t = (w_{t+1} + κs)/ρ, u = ((ρ−1)·w_{t+1} − κs)/ρ
        inv_rho_sq = 1.0 / (1.0 + decay).square()
        ke, kkd = kappa * e, kappa * kappa * d
        w_sq = (a + 2.0 * ke + kkd) * inv_rho_sq
        u_sq = (decay * decay * a - 2.0 * decay * ke + kkd) * inv_rho_sq
        wu = (decay * a + (decay - 1.0) * ke - kkd) * inv_rho_sq
        delta = _angle(w_sq, u_sq, wu)
        # h_t = ‖g‖² + 2α⟨v_{t−1}, g⟩ with torch's dampened buffer rescaled to SMD's v (heavy ball)
        unit_grad_sq = (g_sq + h_factor * vg) * w_sq
        w_norm = w_sq.sqrt()
        if self._missing is not None:
            # No gradient: the optimizer skipped the tensor. Its state would describe an update
            # that did not happen: Δ = 0, ‖w_t‖ = ‖w_{t+1}‖ (a snapshot measured what happened
            # anyway), and no unit-gradient sample.
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
