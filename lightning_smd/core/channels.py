"""Per-channel metrics: turns the per-unit columns of a measured step's host statistics into distributions, stalled fractions and histograms.

Every tracked tensor with per-unit statistics (see :mod:`lightning_smd.core.units`) contributes, per
measured step, one Δ_t, ‖w_t‖ and unit-gradient sample per invariance unit. From them, on the host
(the values came with the per-tensor statistics in the step's one transfer):

* ``smd/channel/angular_update/{p05,p50,p95}/{name}`` and ``smd/channel/weight_norm/{p05,p50,p95}/{name}``:
  percentiles over the tensor's units;
* ``smd/channel/weight_norm_theory/{p05,p50,p95}/{name}``: of each unit's predicted ‖w*‖ from its own
  running L (SGD family; every unit shares its group's η, λ, μ);
* ``smd/channel/angular_update_ratio/{p05,p50,p95}``: of Δ_t/Δ* over all units of all tensors (Δ* is
  the group's: it does not depend on the norm, so it is the same for every unit);
* ``smd/channel/stalled_fraction/{name}``: the fraction of units whose Δ_t/Δ* stayed below
  :data:`STALL_RATIO` at every measured step for at least the equilibrium window (dead filters).

:class:`ChannelMetrics` also keeps the per-unit Δ_t/Δ* of the recent measured steps (a bounded,
thinned record) for the units × steps heatmaps, and the latest per-unit values for the histograms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import compress
from typing import Iterator, Sequence

import numpy as np

from lightning_smd.core import theory

__all__ = ["PERCENTILES", "STALL_RATIO", "ChannelMetrics", "UnitHistories", "UnitHistory", "segment_percentiles"]

PERCENTILES = (5, 50, 95)
_SUFFIX = tuple(f"p{q:02d}" for q in PERCENTILES)
#: a unit whose Δ_t stays below this fraction of Δ* over the equilibrium window is stalled
STALL_RATIO = 0.1


@dataclass
class UnitHistory:
    """Per-unit Δ_t/Δ* of one tensor over measured steps, at most ``capacity`` columns: when full,
    every other column is dropped (the record thins evenly, a long run keeps its whole span)."""

    capacity: int = 256
    steps: list[int] = field(default_factory=list)
    columns: list[np.ndarray] = field(default_factory=list)
    _stride: int = 1
    _seen: int = 0

    def append(self, step: int, values: np.ndarray) -> None:
        self._seen += 1
        if (self._seen - 1) % self._stride:
            return
        self.steps.append(int(step))
        self.columns.append(np.asarray(values, dtype=np.float32))
        if len(self.columns) > self.capacity:
            self.steps, self.columns = self.steps[::2], self.columns[::2]
            self._stride *= 2

    def matrix(self) -> np.ndarray:
        """``[units, steps]``."""
        return np.stack(self.columns, axis=1) if self.columns else np.zeros((0, 0), np.float32)


class _Columns(Sequence):
    """The columns of one tensor in a block's whole-layout columns (views, made when read)."""

    def __init__(self, columns: list[np.ndarray], a: int, b: int) -> None:
        self._columns, self._a, self._b = columns, a, b

    def __len__(self) -> int:
        return len(self._columns)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [c[self._a:self._b] for c in self._columns[i]]
        return self._columns[i][self._a:self._b]


class _BlockView:
    """A :class:`UnitHistory` of one tensor read out of its layout's block (no copy)."""

    def __init__(self, record: UnitHistory, a: int, b: int) -> None:
        self._record, self._a, self._b = record, a, b

    @property
    def steps(self) -> list[int]:
        return self._record.steps

    @property
    def columns(self) -> _Columns:
        return _Columns(self._record.columns, self._a, self._b)

    def matrix(self) -> np.ndarray:
        """``[units, steps]``."""
        if not self._record.columns:
            return np.zeros((0, 0), np.float32)
        return np.stack([c[self._a:self._b] for c in self._record.columns], axis=1)


class UnitHistories(Mapping):
    """name → its :class:`UnitHistory` (read-only mapping). The tensors of one layout (the same
    names and unit counts every measured step, the usual case) share one record of whole columns:
    one append per measured step, not one per tensor. A tensor that moves to another layout (the
    tracked set changed) gets a record of its own, continued tensor by tensor."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._own: dict[str, UnitHistory] = {}
        self._blocks: dict[tuple, tuple[UnitHistory, dict[str, tuple[int, int]]]] = {}
        self._owner: dict[str, tuple] = {}  # name → the key of the block holding it

    def append(self, key: tuple, names: list[str], ends: list[int], step: int, values: np.ndarray) -> None:
        block = self._blocks.get(key)
        if block is None and not any(n in self._own or n in self._owner for n in names):
            spans = dict(zip(names, zip([0] + ends[:-1], ends)))
            block = self._blocks[key] = (UnitHistory(self.capacity), spans)
            self._owner.update(dict.fromkeys(names, key))
        if block is not None:
            block[0].append(step, values)
            return
        for name in names:  # the tensors' own records (split out of their earlier blocks)
            if name in self._owner:
                self._split(self._owner[name])
        for name, a, b in zip(names, [0] + ends[:-1], ends):
            own = self._own.get(name)
            if own is None:
                own = self._own[name] = UnitHistory(self.capacity)
            own.append(step, values[a:b])

    def _split(self, key: tuple) -> None:
        record, spans = self._blocks.pop(key)
        for name, (a, b) in spans.items():
            self._owner.pop(name, None)
            self._own[name] = UnitHistory(record.capacity, list(record.steps), [c[a:b] for c in record.columns],
                                          record._stride, record._seen)

    def __getitem__(self, name: str) -> UnitHistory | _BlockView:
        own = self._own.get(name)
        if own is not None:
            return own
        record, spans = self._blocks[self._owner[name]]
        return _BlockView(record, *spans[name])

    def __iter__(self) -> Iterator[str]:
        yield from self._own
        yield from self._owner

    def __len__(self) -> int:
        return len(self._own) + len(self._owner)

    def __contains__(self, name: object) -> bool:
        return name in self._own or name in self._owner


class ChannelMetrics:
    """Per measured step, the per-channel metrics of the tensors with per-unit statistics.

    ``window``: the equilibrium window in optimizer steps; ``ema_steps``: the time constant of the
    per-unit running L (like :class:`~lightning_smd.core.estimates.RunningMean`, bias-corrected).
    The running L and the stall windows are checkpointed (:meth:`state_dict`), so a resumed run
    logs what an uninterrupted one would.
    """

    def __init__(self, window: int, ema_steps: float, history_capacity: int = 256) -> None:
        self.window = int(window)
        self.time_constant = float(ema_steps)
        self.history_capacity = history_capacity
        self.history = UnitHistories(history_capacity)
        self._latest: dict[str, np.ndarray] = {}
        self._latest_norm: dict[str, np.ndarray] = {}
        self._has_theory: dict[str, bool] = {}
        self._pending: list[tuple] = []  # the latest steps' whole arrays, split per tensor when read
        self.fresh = False  # a per-channel step was built and its histograms not yet logged
        self.stalled: dict[str, float] = {}
        self._layout_key: tuple | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._restored: dict[str, dict[str, np.ndarray]] = {}  # per tensor, from a checkpoint, until first used
        self._keys: dict[str, tuple[tuple[str, ...], ...]] = {}

    @property
    def latest(self) -> dict[str, np.ndarray]:
        """name → the last per-unit Δ_t/Δ* (or Δ_t without theory)."""
        self._settle()
        return self._latest

    @property
    def latest_norm(self) -> dict[str, np.ndarray]:
        """name → the last per-unit ‖w_t‖."""
        self._settle()
        return self._latest_norm

    @property
    def has_theory(self) -> dict[str, bool]:
        """name → whether :attr:`latest` and :attr:`history` hold Δ_t/Δ* (else Δ_t)."""
        self._settle()
        return self._has_theory

    def _settle(self) -> None:
        """Split the steps' whole arrays per tensor (only when read: histograms, figures)."""
        for names, ends, ratio, norm, theory_known in self._pending:
            starts = [0] + ends[:-1]
            self._latest.update({n: ratio[a:b] for n, a, b in zip(names, starts, ends)})
            self._latest_norm.update({n: norm[a:b] for n, a, b in zip(names, starts, ends)})
            self._has_theory.update(zip(names, theory_known))
        self._pending = []

    def state_dict(self) -> dict[str, dict[str, list[float]]]:
        """Per tensor, its units' running L (``mean``, ``weight``, ``last``) and stall windows
        (``since``), as plain lists (a checkpoint holds no numpy arrays)."""
        state = {name: {q: v.tolist() for q, v in arrays.items()} for name, arrays in self._restored.items()}
        if self._layout_key is not None:
            at = 0
            for name, k in zip(*self._layout_key):
                state[name] = {q: v[at:at + k].tolist() for q, v in self._arrays.items()}
                at += k
        return state

    def load_state_dict(self, state: dict[str, dict[str, list[float]]]) -> None:
        self._restored = {name: {q: np.asarray(v, dtype=np.float64) for q, v in arrays.items()}
                          for name, arrays in state.items()}
        self._layout_key, self._arrays = None, {}

    def _flat_keys(self, names: list[str]) -> tuple[list[str], list[str]]:
        """The percentile keys of ``names`` in one list ([tensor][kind][percentile]) and their
        stalled-fraction keys; cached for the last list of names."""
        key = tuple(names)
        cached = getattr(self, "_flat_cache", None)
        if cached is None or cached[0] != key:
            flat = [k for name in names for kind in self.keys(name) for k in kind]
            cached = self._flat_cache = (key, flat, [f"smd/channel/stalled_fraction/{name}" for name in names])
        return cached[1], cached[2]

    def keys(self, name: str) -> tuple[tuple[str, ...], ...]:
        keys = self._keys.get(name)
        if keys is None:
            keys = self._keys[name] = tuple(
                tuple(f"smd/channel/{kind}/{p}/{name}" for p in _SUFFIX)
                for kind in ("angular_update", "weight_norm", "weight_norm_theory"))
        return keys

    def _state(self, names: list[str], counts: list[int]) -> dict[str, np.ndarray]:
        """The per-unit running L and stall windows of ``names`` as arrays over all their units, in
        order (one array per quantity: the step's work is a few whole-array operations). When the
        tracked set changes, each known tensor keeps its units' state, new ones start empty."""
        key = (tuple(names), tuple(counts))
        if self._layout_key == key:
            return self._arrays
        old = dict(self._restored)
        self._restored = {}
        if self._layout_key is not None:
            at = 0
            for name, k in zip(*self._layout_key):
                old[name] = {q: v[at:at + k] for q, v in self._arrays.items()}
                at += k
        m = sum(counts)
        arrays = {"mean": np.zeros(m), "weight": np.zeros(m), "last": np.full(m, np.nan),
                  "since": np.full(m, np.nan)}
        at = 0
        for name, k in zip(names, counts):
            if name in old and old[name]["mean"].shape == (k,):
                for q in arrays:
                    arrays[q][at:at + k] = old[name][q]
            at += k
        self._layout_key, self._arrays = key, arrays
        return arrays

    def build(self, units: np.ndarray, names: list[str], counts: list[int], theories: list[theory.GroupTheory],
              step: int, log_step: int, into: dict[str, float] | None = None,
              delta_star: np.ndarray | None = None) -> dict[str, float]:
        """``units``: host ``[3, m]`` (Δ_t, ‖w_t‖, L sample) of the tensors ``names`` with ``counts``
        units each (in order); ``theories[i]``: the group theory of ``names[i]``; ``delta_star``: each
        tensor's Δ* (NaN: none) where it is not the group's (Muon's depends on the matrix shape), else
        ``None``.

        Vectorized over all units: the percentiles of every tensor come from one sort
        (:func:`segment_percentiles`), the running L and stall windows are whole-array updates;
        what remains per tensor is building its metric keys. ``into``: the dict the metrics are
        added to (and returned); a new one when ``None``."""
        metrics: dict[str, float] = {} if into is None else into
        counts_arr = np.asarray(counts, dtype=np.int64)
        m = int(counts_arr.sum())
        delta, w_norm, sample = (np.asarray(units[i, :m], dtype=np.float64) for i in range(3))
        finite = np.isfinite(delta) & np.isfinite(w_norm)
        state = self._state(names, counts)
        # per-tensor theory, expanded to its units (one GroupTheory object per param group)
        per_group: dict[int, tuple[float, float]] = {}
        one_t, star_t = np.empty(len(names)), np.empty(len(names))
        for i, group_theory in enumerate(theories):
            known = per_group.get(id(group_theory))
            if known is None:
                try:  # ‖w*‖² ∝ √L (SGD family): the value at L = 1 scales to every unit
                    one = group_theory.equilibrium_norm_sq(1.0)
                except ValueError:  # η or λ not positive: no equilibrium
                    one = None
                star = group_theory.angular_update
                known = per_group[id(group_theory)] = (math.nan if one is None else math.sqrt(one),
                                                       float(star) if star else math.nan)
            one_t[i], star_t[i] = known
        if delta_star is not None:
            star_t = np.where(np.asarray(delta_star, dtype=np.float64) != 0, delta_star, np.nan)
        one_u, star_u = np.repeat(one_t, counts_arr), np.repeat(star_t, counts_arr)
        # running per-unit L (bias-corrected EMA), skipping non-finite samples
        sample = np.where(finite, sample, np.nan)
        ok = np.isfinite(sample)
        last = np.where(np.isnan(state["last"]), step - 1, state["last"])
        keep = np.exp(-np.maximum(step - last, 1) / self.time_constant)
        state["mean"] = np.where(ok, keep * state["mean"] + (1.0 - keep) * np.where(ok, sample, 0.0), state["mean"])
        state["weight"] = np.where(ok, keep * state["weight"] + (1.0 - keep), state["weight"])
        state["last"] = np.where(ok, step, state["last"])
        with np.errstate(invalid="ignore", divide="ignore"):
            unit_grad = np.where(state["weight"] > 0, state["mean"] / state["weight"], np.nan)
            predicted = one_u * np.where(unit_grad > 0, unit_grad, np.nan) ** 0.25
            has_star = np.isfinite(star_u)
            ratio = np.where(finite, np.where(has_star, delta / np.where(has_star, star_u, 1.0), delta), np.nan)
        # stall windows: units below STALL_RATIO of Δ* since when (NaN: not below)
        below = has_star & (ratio < STALL_RATIO)
        state["since"] = np.where(below, np.where(np.isnan(state["since"]), log_step, state["since"]), np.nan)
        stalled_unit = below & (log_step - state["since"] >= self.window)
        quantiles = segment_percentiles(np.stack([np.where(finite, delta, np.nan), np.where(finite, w_norm, np.nan),
                                                  predicted]), counts_arr, PERCENTILES)
        # what remains per tensor is dict work, no numpy call: the keys in one list per layout
        flat_keys, stalled_keys = self._flat_keys(names)
        values = quantiles.transpose(1, 0, 2).reshape(-1).tolist()  # [tensor][kind][percentile]
        present = (~np.isnan(quantiles.transpose(1, 0, 2))).ravel().tolist()
        metrics.update(zip(compress(flat_keys, present), compress(values, present)))
        theory_known = (np.isfinite(star_t) & (counts_arr > 0)).tolist()
        if any(theory_known):
            stalled_sum = np.bincount(np.repeat(np.arange(len(names)), counts_arr), weights=stalled_unit,
                                      minlength=len(names))
            fractions = (stalled_sum / np.maximum(counts_arr, 1)).tolist()
            self.stalled.update(zip(compress(names, theory_known), compress(fractions, theory_known)))
            metrics.update(zip(compress(stalled_keys, theory_known), compress(fractions, theory_known)))
        ends = np.cumsum(counts_arr).tolist()
        norm = np.where(finite, w_norm, np.nan)
        self._pending.append((names, ends, ratio, norm, theory_known))
        if len(self._pending) > 8:
            self._settle()
        self.history.append(self._layout_key, names, ends, log_step, ratio.astype(np.float32))
        self.fresh = True
        pooled = ratio[has_star & finite]
        if pooled.size:
            for p, v in zip(_SUFFIX, np.percentile(pooled, PERCENTILES).tolist()):
                metrics[f"smd/channel/angular_update_ratio/{p}"] = v
        return metrics


def _starts(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _interpolate(ordered: np.ndarray, n_finite: np.ndarray, q: np.ndarray) -> np.ndarray:
    """numpy's ``linear`` percentiles ``q`` of rows sorted along the last axis, finite values first
    (``n_finite`` of them); NaN where there is none."""
    last = np.maximum(n_finite - 1, 0)[..., None]
    pos = last * q
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, last)
    frac = pos - lo
    a, b = np.take_along_axis(ordered, lo, axis=-1), np.take_along_axis(ordered, hi, axis=-1)
    with np.errstate(invalid="ignore"):
        result = np.where(frac >= 0.5, b - (b - a) * (1.0 - frac), a + (b - a) * frac)
    return np.where((n_finite > 0)[..., None], result, np.nan)


def segment_percentiles(values: np.ndarray, counts: np.ndarray, percentiles) -> np.ndarray:
    """Percentiles (numpy's ``linear`` method) of consecutive segments of ``values``, NaN excluded.

    ``values``: ``[K, m]``, ``counts``: segment lengths summing to ``m``. Returns ``[K, segments,
    len(percentiles)]``, NaN where a segment has no finite value. One sort for all segments and rows.
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    counts = np.asarray(counts, dtype=np.int64)
    n_rows, m = values.shape
    n_seg = len(counts)
    q = np.asarray(percentiles, dtype=np.float64) / 100.0
    out = np.full((n_rows, n_seg, len(q)), np.nan)
    if m == 0 or n_seg == 0:
        return out
    sizes = counts[:1] if counts.min() == counts.max() else np.unique(counts)
    if len(sizes) <= 32:  # models repeat a few widths: each width's segments sorted as one [K, n, c] block
        keyed = np.where(np.isfinite(values), values, np.inf)
        starts = _starts(counts)
        for c in sizes.tolist():
            if c == 0:
                continue
            segments = np.flatnonzero(counts == c)
            if len(segments) == n_seg:  # every segment this wide: the rows are the blocks already
                block = np.sort(keyed.reshape(n_rows, n_seg, c), axis=-1)
            else:
                block = np.sort(keyed[:, starts[segments, None] + np.arange(c)], axis=-1)  # [K, n, c]
            out[:, segments] = _interpolate(block, np.isfinite(block).sum(axis=-1), q)
        return out
    segment = np.repeat(np.arange(n_seg), counts)
    finite = np.isfinite(values)
    keyed = np.where(finite, values, np.inf)
    # sort each row within segments: segment id as the major key
    order = np.lexsort((keyed, np.broadcast_to(segment, keyed.shape)), axis=-1)
    ordered = np.take_along_axis(keyed, order, axis=-1)
    n_finite = np.stack([np.bincount(segment, weights=f, minlength=n_seg) for f in finite]).astype(np.int64)
    pos = np.maximum(n_finite - 1, 0)[..., None] * q  # [K, segments, Q]
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(n_finite - 1, 0)[..., None])
    frac = pos - lo
    base = _starts(counts)[None, :, None]
    rows = np.arange(n_rows)[:, None, None]
    a, b = ordered[rows, base + lo], ordered[rows, base + hi]
    with np.errstate(invalid="ignore"):
        result = np.where(frac >= 0.5, b - (b - a) * (1.0 - frac), a + (b - a) * frac)
    return np.where((n_finite > 0)[..., None], result, out)
