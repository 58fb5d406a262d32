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
(a row-wise ``vector_norm`` for squared norms, ``linalg.vecdot`` for dots), else contiguous runs of
elements (a BLAS ``dot``, the cheapest read on CPU). The per-tensor sums and the per-unit sums are
sums of the row sums (one ``index_add_`` each): per-channel statistics need no second read. The pass
runs in *pieces* of at most :data:`PIECE_NUMEL` elements (1 MiB of fp32 on CPU: cache-resident):
small tensors (under :data:`SMALL_NUMEL` elements) of one param group with the same trailing
shape, dtype, strides and device are concatenated (one ``torch.cat`` into a scratch buffer) and
reduced per output channel, so a model of thousands of small tensors costs a few calls per piece,
not per tensor; large tensors are cut into pieces of whole rows, read where they lie. A source that
must be formed (Adam's ``m/(√v + ε)``, Lion's sign, Nesterov's sum) is formed piece by piece into the
same scratch buffers, so it costs one read of the optimizer state and no tensor-sized temporary.
The layout of the pass is planned once per set of shapes and cached; the optimizer state and
Adam's step counts are looked up once per step (one value per group when the counts agree).
All rows go to the host in the step's one transfer.

Δ_t uses the stable form ``atan2(‖u_⊥‖, ‖w_t‖ + ⟨ŵ_t, u⟩)``, never ``acos`` of a cosine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from lightning_smd.core.theory import effective_weight_decay

__all__ = ["GroupSlice", "PIECE_NUMEL", "SMALL_NUMEL", "Sources", "StepMeasurer", "angular_update", "local", "measurement_mode", "row_sums"]

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
    # within after_step only: the state dicts and (Adam) step counts read once for the step
    _dicts: list | None = field(default=None, repr=False)
    _step_values: float | list[float] | None = field(default=None, repr=False)
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
        dicts = self._dicts if self._dicts is not None else self.state_dicts()
        out = [st.get(key) if st else None for st in dicts]
        return [local(t) if t is not None else None for t in out] if self._distributed else out

    def state_dicts(self) -> list[dict | None]:
        """Each tensor's optimizer state (``None`` before its first step)."""
        state = self.optimizer.state
        return [state.get(p) for p in self.params]

    def buffers(self) -> list[Tensor | None]:
        return self.state_tensors("momentum_buffer")

    # ------------------------------------------------------------------ the update's source
    def read_steps(self) -> None:
        """After the step: each tensor's optimizer state, looked up once for the step, and (Adam)
        its step count, for :meth:`coefficients` and :meth:`source`: one number when they agree
        (the usual case), else one per tensor. :meth:`forget_step` drops them."""
        self._dicts = self.state_dicts()
        if self.mode != "adam":
            self._step_values = None
            return
        self._step_values = _step_counts(self.state_tensors("step"))

    def forget_step(self) -> None:
        self._dicts = self._step_values = None

    def _steps(self) -> float | list[float]:
        if self._step_values is None:
            self.read_steps()
        return self._step_values

    def coefficients(self) -> tuple[float, float | list[float]]:
        """``(ρ − 1, κ)`` of ``w_{t+1} = ρ·w_t − κ·s`` for this step (hyper-parameters as read before
        it; Adam's bias corrections from the step counts after it): ρ − 1 is the group's, κ one
        number or, for Adam tensors at different step counts, one per tensor."""
        lr, wd = self.lr, self.weight_decay
        if self.mode == "buffer":
            return 0.0, lr
        if self.mode == "snapshot":
            return 0.0, 1.0
        if self.mode == "adam":
            decay = -lr * wd if self.group.get("decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW)) else 0.0
            beta1, beta2 = (float(b) for b in self.group["betas"])

            def kappa(t: float) -> float:
                return lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t) if t > 0 else 0.0

            steps = self._steps()
            return decay, [kappa(t) for t in steps] if isinstance(steps, list) else kappa(steps)
        if self.mode == "lion":
            wd_eff = effective_weight_decay(self.optimizer, self.group, lr, wd)  # decays tied to η (timm, lion-pytorch)
            return -lr * wd_eff, lr
        return -lr * wd, lr  # grad, nesterov

    def source(self) -> "Sources":
        """After the step: the source ``s`` of every tensor, formed piece by piece when the row
        pass reduces it (see :class:`Sources`)."""
        if self.mode in ("buffer", "grad", "snapshot"):
            direct = {"buffer": self.buffers, "grad": self.grads, "snapshot": lambda: self.snapshot}[self.mode]()
            return Sources([direct])
        if self.mode == "nesterov":
            return Sources([self.grads_or_none(), self.buffers()], _nesterov, self.momentum)
        if self.mode == "lion":
            beta1, beta2 = (float(b) for b in self.group["betas"])
            # c = β1·m_t + (1−β1)·g with m_t = (m_{t+1} − (1−β2)·g)/β2
            alpha, beta = beta1 / beta2, (1.0 - beta1) - beta1 * (1.0 - beta2) / beta2
            return Sources([self.state_tensors("exp_avg"), self.grads_or_none()], _lion, (alpha, beta))
        # adam: m / (√v + ε·√b₂)
        beta2 = float(self.group["betas"][1])
        eps = float(self.group["eps"])
        second = self.state_tensors("max_exp_avg_sq" if self.group.get("amsgrad", False) else "exp_avg_sq")
        steps = self._steps()

        def eps_t(t: float) -> float:
            return eps * math.sqrt(max(1.0 - beta2 ** t, 0.0))

        return Sources([self.state_tensors("exp_avg"), second], _adam,
                       [eps_t(t) for t in steps] if isinstance(steps, list) else eps_t(steps))


# The sources formed from two inputs, written into ``out`` (``tmp``: a second scratch buffer). In
# the fused pass the first input may already lie in ``out`` and the second in ``tmp``.
def _nesterov(out: Tensor | None, tmp: Tensor | None, g: Tensor, b: Tensor, momentum: float) -> Tensor:
    return torch.add(g, b, alpha=momentum, out=out)


def _lion(out: Tensor | None, tmp: Tensor | None, m: Tensor, g: Tensor, ab: tuple[float, float]) -> Tensor:
    return torch.mul(m, ab[0], out=out).add_(g, alpha=ab[1]).sign_()


def _adam(out: Tensor | None, tmp: Tensor | None, m: Tensor, v: Tensor, eps: float) -> Tensor:
    denominator = torch.sqrt(v, out=tmp).add_(eps)
    return torch.div(m, denominator, out=out)


class Sources:
    """The update's source of a list of tensors, formed only when a piece of the row pass needs it.

    ``inputs[k][i]``: the k-th input of tensor ``i`` (``None``: no state; for the first input, the
    tensor did not move); no ``recipe``: the source is the first input itself (read where it lies);
    else ``recipe(out, tmp, *inputs, scalar)`` forms it elementwise into a scratch buffer, with
    ``scalar`` one constant or one per tensor. No inputs at all: no source (its sums are zero).
    """

    def __init__(self, inputs: list[list[Tensor | None]], recipe: Callable | None = None, scalar: Any = None) -> None:
        self.inputs, self.recipe, self.scalar = inputs, recipe, scalar

    @property
    def absent(self) -> bool:
        return not self.inputs

    def scalar_of(self, i: int) -> Any:
        return self.scalar[i] if isinstance(self.scalar, list) else self.scalar

    def uniform(self, idx: Sequence[int]) -> bool:
        """Whether tensors ``idx`` can be formed together: every input present, one scalar."""
        if isinstance(self.scalar, list) and len({self.scalar[i] for i in idx}) > 1:
            return False
        return all(inp[i] is not None for inp in self.inputs for i in idx)

    def one(self, i: int) -> Tensor | None:
        """Tensor ``i``'s whole source (a fallback: allocates its size), ``None`` if it did not move."""
        if self.absent or self.inputs[0][i] is None:
            return None
        args = [inp[i] for inp in self.inputs]
        if self.recipe is None:
            return args[0]
        args = [a if a is not None else torch.zeros_like(args[0]) for a in args]
        return self.recipe(None, None, *args, self.scalar_of(i))

    @staticmethod
    def concat(parts: list["Sources"]) -> "Sources":
        return parts[0] if len(parts) == 1 else _Joined(parts)

    def locate(self, i: int) -> tuple["Sources", int]:
        """The :class:`Sources` holding tensor ``i`` and its index there."""
        return self, i


class _Joined(Sources):
    """Several slices' sources, indexed as one list (a piece of the row pass never spans two)."""

    def __init__(self, parts: list[Sources]) -> None:
        self.parts = parts
        self.where: list[tuple[Sources, int]] = []
        for p in parts:
            n = len(p.inputs[0]) if p.inputs else getattr(p, "size", 0)
            self.where.extend((p, j) for j in range(n))

    def locate(self, i: int) -> tuple[Sources, int]:
        return self.where[i]

    def one(self, i: int) -> Tensor | None:
        part, j = self.where[i]
        return part.one(j)


def no_source(n: int) -> Sources:
    """``n`` tensors without a partner (the ``d`` and ``y`` sums are zero)."""
    s = Sources([])
    s.size = n
    return s


# ---------------------------------------------------------------------------- the fused row pass
#: elements of one piece of the fused pass (fp32: 1 MiB on CPU, within the L2/L3 cache; 16 MiB on
#: CUDA): small tensors are concatenated into pieces of at most this size, large ones are cut into
#: pieces of whole rows (per-tensor sums: of contiguous elements), and each piece's update source is
#: formed in a scratch buffer of this size, so Adam's ``m/(√v + ε)`` costs one read of m and v
PIECE_NUMEL = {"cpu": 1 << 18, "cuda": 1 << 22}


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


@dataclass
class _Piece:
    """One reduction of the fused pass: ``kind`` ``"cat"`` (small tensors ``tensors``, concatenated
    along dim 0 and reduced per output channel), ``"rows"`` (rows ``lo:hi`` of one tensor viewed as
    ``[rows, numel/rows]``) or ``"flat"`` (elements ``lo:hi`` of one tensor, one row); its rows go to
    ``row:row + n_rows`` of the output."""

    kind: str
    tensors: tuple[int, ...]
    lo: int
    hi: int
    row: int
    n_rows: int
    numel: int
    shape: tuple[int, ...]  # the piece's scratch shape


def _step_counts(steps: Sequence[Tensor | float | None]) -> float | list[float]:
    """Adam's step counts (``None``: no state yet, 0): one number when they agree (the usual case),
    else one per tensor. Tensors are read together: one stack and one device-to-host copy per
    device (``capturable`` Adam keeps them on the accelerator), not one ``.item()`` per tensor."""
    if steps and all(isinstance(t, Tensor) for t in steps):
        devices = {(t.device, t.dtype) for t in steps}
        if len(devices) == 1:  # the usual case: one stack, one copy, compared on the host
            host = torch.stack([t.reshape(()) for t in steps]).cpu().double().numpy()
            return float(host[0]) if (host == host[0]).all() else host.tolist()
    values: list[float] = [0.0] * len(steps)
    by_device: dict[tuple, list[int]] = {}
    for i, t in enumerate(steps):
        if isinstance(t, Tensor):
            by_device.setdefault((t.device, t.dtype), []).append(i)
        elif t is not None:
            values[i] = float(t)
    for at in by_device.values():
        host = torch.stack([steps[i].reshape(()) for i in at]).cpu().double().tolist()
        for i, v in zip(at, host):
            values[i] = v
    first = values[0] if values else 0.0
    return first if all(v == first for v in values) else values


@dataclass
class RowPlan:
    """How one list of tensors is reduced per row: which tensors go together (``buckets``, in the
    order their rows come out), each tensor's row count, and the ``pieces`` the pass runs."""

    rows: list[int]
    buckets: list[list[int]]
    pieces: list[_Piece] = field(default_factory=list)
    #: per tensor: the rows of its ``[rows, numel/rows]`` view (``None``: cut into flat pieces)
    view_rows: list[int | None] = field(default_factory=list)
    scratch_numel: int = 0
    #: the accumulation dtype: fp32, float64 if any tensor is
    acc: torch.dtype = torch.float32

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    @classmethod
    def build(cls, xs: Sequence[Tensor], units: Sequence[int], groups: Sequence[int] | None = None,
              piece_numel: int | None = None) -> "RowPlan":
        """``units[i]``: the rows tensor ``i`` needs at least (its invariance units this step, 1 for
        per-tensor sums only); small tensors sharing a bucket (same ``groups[i]``, trailing shape,
        dtype, strides and device) are reduced per output channel."""
        buckets: list[list[int]] = []
        shared: dict[tuple, list[int]] = {}
        for i, x in enumerate(xs):
            if x.numel() >= SMALL_NUMEL or x.dim() < 2 or x.shape[0] == 0:
                buckets.append([i])
                continue
            key = (groups[i] if groups is not None else 0, x.device, x.dtype, tuple(x.shape[1:]), x.stride())
            if key not in shared:
                shared[key] = []
                buckets.append(shared[key])
            shared[key].append(i)
        rows = [0] * len(xs)
        view_rows: list[int | None] = [None] * len(xs)
        pieces: list[_Piece] = []
        at, scratch = 0, 0
        for bucket in buckets:
            limit = piece_numel or PIECE_NUMEL.get(xs[bucket[0]].device.type, PIECE_NUMEL["cuda"])
            if len(bucket) > 1:
                trailing = tuple(xs[bucket[0]].shape[1:])
                chunk: list[int] = []
                for j, i in enumerate(bucket):
                    chunk.append(i)
                    rows[i] = xs[i].shape[0]
                    size = sum(xs[k].numel() for k in chunk)
                    if size >= limit or j == len(bucket) - 1:
                        n_rows = sum(rows[k] for k in chunk)
                        pieces.append(_Piece("cat", tuple(chunk), 0, n_rows, at, n_rows, size, (n_rows, *trailing)))
                        at, scratch, chunk = at + n_rows, max(scratch, size), []
                continue
            i = bucket[0]
            x, k = xs[i], units[i]
            numel = x.numel()
            if k > 1:  # one row per unit, whole rows per piece
                width = numel // k
                step = max(1, limit // max(width, 1))
                rows[i], view_rows[i] = k, k
                for lo in range(0, k, step):
                    hi = min(k, lo + step)
                    pieces.append(_Piece("rows", (i,), lo, hi, at + lo, hi - lo, (hi - lo) * width, (hi - lo, width)))
                    scratch = max(scratch, (hi - lo) * width)
            else:  # per-tensor sums: near-equal pieces of contiguous elements, one partial row each
                count = max(1, -(-numel // limit))
                rows[i] = count
                for j in range(count):
                    lo, hi = j * numel // count, (j + 1) * numel // count
                    pieces.append(_Piece("flat", (i,), lo, hi, at + j, 1, hi - lo, (hi - lo,)))
                    scratch = max(scratch, hi - lo)
            at += rows[i]
        acc = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
        return cls(rows, buckets, pieces, view_rows, scratch, acc)

    def row_tensor(self) -> list[int]:
        """The tensor each output row belongs to (in output order)."""
        return [i for b in self.buckets for i in b for _ in range(self.rows[i])]

    def row_in_tensor(self) -> list[int]:
        return [r for b in self.buckets for i in b for r in range(self.rows[i])]


def _memory_order(x: Tensor) -> list[int] | None:
    """The permutation of ``x``'s dims in memory order when it is dense with dim 0 outermost but not
    contiguous (``channels_last``); ``None`` otherwise (logical order: a view if contiguous)."""
    if x.is_contiguous() or x.dim() < 2:
        return None
    order = sorted(range(x.dim()), key=lambda i: (-x.stride(i), -x.shape[i]))
    if order[0] == 0 and x.permute(order).is_contiguous():
        return order
    return None


def _as_rows(t: Tensor, rows: int, order: list[int] | None) -> Tensor:
    """``t`` as ``[rows, numel/rows]`` in the element order ``order`` gives (the same for every
    input of a tensor): a view where the memory allows, a copy otherwise."""
    if order is not None:
        t = t.permute(order)
    return t.view(rows, -1) if t.is_contiguous() else t.reshape(rows, -1)


class _Scratch:
    """The two scratch buffers of one row pass, per dtype and device (transient: freed with it)."""

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.buffers: dict[tuple, tuple[Tensor, Tensor]] = {}

    def get(self, like: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        key = (like.dtype, like.device)
        pair = self.buffers.get(key)
        if pair is None:
            pair = self.buffers[key] = (torch.empty(self.numel, dtype=like.dtype, device=like.device),
                                        torch.empty(self.numel, dtype=like.dtype, device=like.device))
        n = math.prod(shape)
        return pair[0][:n].view(shape), pair[1][:n].view(shape)


def row_sums(xs: Sequence[Tensor], ys: "Sequence[Tensor | None] | Sources", want: str, plan: RowPlan) -> Tensor:
    """``[len(want), rows]`` per-row sums, rows in ``plan``'s order: ``"x"`` ‖x‖², ``"y"`` ‖y‖²,
    ``"d"`` ⟨x, y⟩ (a missing ``y`` counts as zero). Accumulated in fp32 (float64 if any input is).
    ``ys`` may be a :class:`Sources`: each piece's partner is then formed when it is reduced."""
    if not isinstance(ys, Sources):
        ys = Sources([list(ys)])
    acc = plan.acc
    device = xs[0].device if xs else torch.device("cpu")
    out = torch.zeros(len(want), plan.total_rows, dtype=acc, device=device)
    scratch = _Scratch(plan.scratch_numel)
    views: dict[int, tuple] = {}  # tensor → (its x view, its inputs' views) while its pieces run
    for piece in plan.pieces:
        x, y = _operands(piece, xs, ys, plan, scratch, views)
        a, b = piece.row, piece.row + piece.n_rows
        block = out[:, a:b] if x.device == device else torch.zeros(len(want), piece.n_rows, dtype=acc, device=x.device)
        for k, kind in enumerate(want):
            if kind == "x":
                _norm(x, acc, block[k])
            elif y is None:
                continue
            elif kind == "y":
                _norm(y, acc, block[k])
            elif x.dim() == 1:  # one BLAS dot streams at the memory bandwidth; a row vecdot is ~2x slower
                torch.dot(x.to(acc), y.to(acc), out=block[k, 0])
            else:
                torch.linalg.vecdot(x.to(acc), y.to(acc), out=block[k])
        if x.device != device:
            out[:, a:b] = block.to(device)
    for k, kind in enumerate(want):
        if kind in "xy":
            out[k].square_()
    return out


def _norm(x: Tensor, acc: torch.dtype, dst: Tensor) -> None:
    if x.dim() == 1:
        torch.linalg.vector_norm(x, dtype=acc, out=dst[0])
    else:
        torch.linalg.vector_norm(x, dim=1, dtype=acc, out=dst)


def _operands(piece: _Piece, xs: Sequence[Tensor], ys: Sources, plan: RowPlan, scratch: _Scratch,
              views: dict[int, tuple]) -> tuple[Tensor, Tensor | None]:
    """The piece's ``x`` and its partner ``y`` (``None``: no partner), as ``[rows, width]`` (or one
    flat row), ``y`` formed in the scratch buffers when it is not read where it lies."""
    src, j0 = ys.locate(piece.tensors[0])
    if piece.kind == "cat":
        out, tmp = scratch.get(xs[piece.tensors[0]], piece.shape)
        idx = [ys.locate(i)[1] for i in piece.tensors]
        y = None
        if not src.absent:
            if src.uniform(idx):
                args = [torch.cat([inp[i] for i in idx], out=buf) for inp, buf in zip(src.inputs, (out, tmp))]
                y = args[0] if src.recipe is None else src.recipe(out, tmp, *args, src.scalar_of(idx[0]))
            else:  # a tensor without state, or Adam tensors at different step counts: each on its own
                parts = [src.one(i) for i in idx]
                if any(p is not None for p in parts):
                    y = torch.cat([p if p is not None else torch.zeros_like(xs[i]) for p, i in zip(parts, piece.tensors)],
                                  out=out)
        # the weights go where the second input was (consumed by now)
        x = torch.cat([xs[i] for i in piece.tensors], out=tmp if y is not None else out)
        width = piece.numel // piece.n_rows if piece.n_rows else 0
        return x.view(piece.n_rows, width), (y.view(piece.n_rows, width) if y is not None else None)
    i = piece.tensors[0]
    known = views.get(i)
    if known is None:
        views.clear()  # the pieces of one tensor are consecutive
        x_full = xs[i]
        order = _memory_order(x_full)
        rows = plan.view_rows[i] or 1
        inputs = None
        if not src.absent and src.inputs[0][j0] is not None:
            args = [inp[j0] for inp in src.inputs]
            args = [a if a is not None else torch.zeros_like(args[0]) for a in args]
            inputs = [_as_rows(a, rows, order) for a in args]
        known = views[i] = (_as_rows(x_full, rows, order), inputs)
    x_rows, inputs = known
    if piece.kind == "flat":
        x = x_rows[0, piece.lo:piece.hi]
        args = [a[0, piece.lo:piece.hi] for a in inputs] if inputs is not None else None
    else:
        x = x_rows[piece.lo:piece.hi]
        args = [a[piece.lo:piece.hi] for a in inputs] if inputs is not None else None
    if args is None:
        return x, None
    if src.recipe is None:
        return x, args[0]
    out, tmp = scratch.get(x, piece.shape)
    return x, src.recipe(out, tmp, *args, src.scalar_of(j0))



@dataclass
class _Layout:
    """The cached layout of one set of active slices: the row plan and the row → column maps."""

    plan: RowPlan
    n: int  # tensor columns
    m: int  # unit columns
    tensor_index: Tensor  # [rows] → tensor column
    unit_index: Tensor | None  # [rows] → n + unit column (n + m: a dropped column), None without units
    column_slice: Tensor  # [n + m] → the active slice of each column
    column_tensor: Tensor  # [n + m] → the tensor of each column


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
        self._current: _Layout | None = None

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
        :class:`~lightning_smd.core.estimates.RunningMean` skips): then nothing is read before the step
        but the snapshot copy of snapshot-mode groups.
        ``per_unit=False``: this step, no unit columns even for slices with ``units``.
        """
        self._per_unit = per_unit
        self._active = [s for s in self.slices if optimizer is None or s.optimizer is optimizer]
        missing: list[bool] = []
        weights: list[Tensor] = []
        for s in self._active:
            # torch's optimizers skip a tensor without gradient: no decay, no momentum, no move
            missing.extend([p.grad is None for p in s.params])
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
        layout = self._current = self._layout(weights)  # the step changes no shape: after_step reuses it
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
            partners.append(Sources([s.buffers()]) if s.mode == "buffer" else no_source(len(s.params)))
        pre = row_sums(grads, Sources.concat(partners), "xd", layout.plan)
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
            s.read_steps()
            parts.append(s.source())
        layout = self._current = self._current if self._current is not None else self._layout(weights)
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
        self._current = None
        for s in self._active:
            s.forget_step()  # read afresh after the next step
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
        groups: list[int] = []
        for g, s in enumerate(self._active):
            units.extend(self._units(s) or [1] * len(s.params))
            unit_rows.extend(s.unit_rows if s.unit_rows is not None and self._units(s) is not None else [None] * len(s.params))
            groups.extend([g] * len(s.params))
        plan = RowPlan.build(weights, [k if r is None else _row_blocks(r) for k, r in zip(units, unit_rows)], groups)
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
        column_tensor = list(range(n)) + [i for i, k in enumerate(units) if unit_start[i] is not None for _ in range(k)]
        layout = _Layout(plan, n, m, torch.tensor(row_tensor, dtype=torch.long).to(device),
                         torch.tensor(unit_cols, dtype=torch.long).to(device) if m else None,
                         torch.tensor([groups[i] for i in column_tensor], dtype=torch.long).to(device),
                         torch.tensor(column_tensor, dtype=torch.long).to(device))
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
        """``[3, n + m]`` per column (ρ − 1, κ, the momentum factor of h), expanded on the device
        from one value per slice (per tensor only for Adam tensors at different step counts);
        cached while they repeat, so a constant-LR stretch builds one tensor, not one per step."""
        layout = self._current
        per_slice = []
        for s in self._active:
            decay, kappa = s.coefficients()
            h = 2.0 * s.momentum / (1.0 - s.dampening) if s.mode == "buffer" and s.dampening != 1.0 else 0.0
            per_slice.append((decay, tuple(kappa) if isinstance(kappa, list) else kappa, h))
        key = (dtype, device, id(layout), tuple(per_slice))
        cached = getattr(self, "_coef_cache", None)
        if cached is not None and cached[0] == key and cached[2] is layout:
            return cached[1]
        if all(not isinstance(k, tuple) for _, k, _ in per_slice):
            values = torch.tensor(list(zip(*per_slice)), dtype=torch.float64).to(dtype).to(device, non_blocking=True)
            coefficients = values.index_select(1, layout.column_slice)
        else:
            columns: list[list[float]] = [[], [], []]
            for s, (decay, kappa, h) in zip(self._active, per_slice):
                n = len(s.params)
                columns[0].extend([decay] * n)
                columns[1].extend(kappa if isinstance(kappa, tuple) else [kappa] * n)
                columns[2].extend([h] * n)
            values = torch.tensor(columns, dtype=torch.float64).to(dtype).to(device, non_blocking=True)
            coefficients = values.index_select(1, layout.column_tensor)
        self._coef_cache = (key, coefficients, layout)
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
