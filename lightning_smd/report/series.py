"""``RunSeries``: what one run logged about its Spherical Motion Dynamics, as arrays.

A ``RunSeries`` is the single input of every figure and table in :mod:`lightning_smd.report`.
It is built from whatever the run left behind:

* :meth:`RunSeries.from_records`: the ``(step, metrics)`` pairs exactly as ``SMDCallback``
  passed them to ``logger.log_metrics`` (the callback keeps that list on rank 0);
* :meth:`RunSeries.from_csv`: Lightning's ``CSVLogger`` ``metrics.csv``;
* :meth:`RunSeries.from_tensorboard`: the event files of Lightning's ``TensorBoardLogger``,
  read with TensorBoard's own ``EventAccumulator`` (needs ``tensorboard``);
* :meth:`RunSeries.from_wandb_offline`: the ``run-*.wandb`` file of an offline W&B run;
* :meth:`RunSeries.from_run_dir`: whichever of these lies below a directory holding one run
  (:func:`find_runs` tells the runs below a folder apart).

Metric keys follow the ``smd/{kind}/{name}`` schema of the callback; a logger prefix
(``"myprefix-smd/..."``, Lightning joins prefixes with ``-``) is stripped. Only numpy is needed.
"""

from __future__ import annotations

import csv
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

__all__ = ["PER_TENSOR_KINDS", "MultipleRunsError", "RunSeries", "RunSource", "find_runs", "read_wandb_records"]

#: Per-tensor series of the metric schema, in the order of the ``RunSeries`` fields.
PER_TENSOR_KINDS = (
    "angular_update",
    "angular_update_theory",
    "weight_norm",
    "weight_norm_theory",
    "unit_grad_sq",
)
_RATIO_KIND = "angular_update_ratio"
_RESCALE_KEY = "rescale_factor"
_EQUILIBRIUM_KIND = "equilibrium_step"
_LR_KEY = re.compile(r"^(?:[^/]*?-)?(lr(?:-.*)?)$")
_LR_EXCLUDE = ("momentum", "weight_decay", "beta")

Records = Iterable[tuple[int, Mapping[str, Any]]]


@dataclass
class RunSeries:
    """Everything one run logged in the ``smd/*`` schema, aligned on a common step axis.

    Attributes:
        steps: ``int64[T]`` sorted optimizer steps at which anything was logged.
        names: the ``N`` scale-invariant tensors, in order of first appearance.
        angular_update, angular_update_theory, weight_norm, weight_norm_theory, unit_grad_sq:
            ``float[T, N]``, NaN where that tensor logged nothing at that step.
        rescale_events: ``(step, factor)`` for every logged ``smd/rescale_factor``.
        lr: learning rates logged by ``LearningRateMonitor`` (``lr-*`` keys), ``float[T]``.
        equilibrium_step: last logged ``smd/equilibrium_step/{name}`` per tensor (the series
            itself is in ``extra``).
        ratio_stats: ``smd/angular_update_ratio/{mean,min,max}`` as ``float[T]``.
        extra: any other ``smd/*`` key (prefix stripped) as ``float[T]``.
    """

    steps: np.ndarray
    names: list[str]
    angular_update: np.ndarray
    angular_update_theory: np.ndarray
    weight_norm: np.ndarray
    weight_norm_theory: np.ndarray
    unit_grad_sq: np.ndarray
    rescale_events: list[tuple[int, float]] = field(default_factory=list)
    lr: dict[str, np.ndarray] = field(default_factory=dict)
    equilibrium_step: dict[str, int | None] = field(default_factory=dict)
    ratio_stats: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    # ------------------------------------------------------------------ views
    @property
    def num_steps(self) -> int:
        """``T``, the number of logged steps."""
        return int(self.steps.shape[0])

    @property
    def ratio(self) -> np.ndarray:
        """``float[T, N]`` Δ_t / Δ*, NaN where either is missing or Δ* is not positive."""
        theory = np.where(self.angular_update_theory > 0, self.angular_update_theory, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.angular_update / theory

    def series(self, kind: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one per-tensor series with its missing points dropped."""
        values = getattr(self, kind)[:, self.names.index(name)]
        keep = np.isfinite(values)
        return self.steps[keep], values[keep]

    def is_empty(self) -> bool:
        """True when the run logged no ``smd/*`` data at all."""
        return not self.names and not self.rescale_events and not self.ratio_stats and not self.extra

    # ----------------------------------------------------------- constructors
    @classmethod
    def from_records(cls, records: Records) -> RunSeries:
        """Build from ``(step, metrics)`` pairs as passed to ``logger.log_metrics``.

        Several records may share a step (they are merged, later values win). Only steps with
        some ``smd/*`` value are kept. Keys outside the schema are ignored, except ``lr-*``
        learning rates (kept at those steps). Non-numeric values are skipped.
        """
        rows = _merge_rows(records)
        parsed = _parse_keys(key for row in rows.values() for key in row)
        rows = {step: row for step, row in rows.items() if _has_smd_key(row, parsed["keys"])}
        steps = np.array(sorted(rows), dtype=np.int64)
        index = {int(s): i for i, s in enumerate(steps)}
        names = parsed["names"]
        column = {name: j for j, name in enumerate(names)}
        shape = (len(steps), len(names))
        matrices = {kind: np.full(shape, np.nan) for kind in PER_TENSOR_KINDS}
        vectors: dict[tuple[str, str], np.ndarray] = {}
        rescale: list[tuple[int, float]] = []
        for step, row in rows.items():
            i = index[step]
            for key, value in row.items():
                target = parsed["keys"].get(key)
                if target is None:
                    continue
                group, sub = target
                if group in matrices:
                    matrices[group][i, column[sub]] = value
                elif group == _RESCALE_KEY:
                    rescale.append((step, value))
                else:
                    vectors.setdefault(target, np.full(len(steps), np.nan))[i] = value
        extra = {sub: v for (group, sub), v in vectors.items() if group == "extra"}
        return cls(
            steps=steps,
            names=names,
            **matrices,
            rescale_events=sorted(r for r in rescale if math.isfinite(r[1])),
            lr={sub: v for (group, sub), v in vectors.items() if group == "lr"},
            equilibrium_step=_equilibrium_steps(extra),
            ratio_stats={sub: v for (group, sub), v in vectors.items() if group == _RATIO_KIND},
            extra=extra,
        )

    @classmethod
    def from_csv(cls, path: str | Path) -> RunSeries:
        """Build from a Lightning ``CSVLogger`` ``metrics.csv`` (or the directory holding it).

        Rows without a ``step`` are skipped; blank cells are missing values; rows sharing a
        step are merged.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "metrics.csv"
        return cls.from_records(_csv_records(path))

    @classmethod
    def from_wandb_offline(cls, run_dir: str | Path) -> RunSeries:
        """Build from an offline W&B run: its ``offline-run-*`` directory or ``.wandb`` file.

        The step of each history row is its ``trainer/global_step`` (what ``WandbLogger``
        logs); rows without it are skipped. A directory holding several ``.wandb`` files
        (e.g. a ``wandb/`` folder) is read through its newest one. W&B does not keep the
        order of the keys in a row, so tensors come in natural order (``layer2`` before
        ``layer10``), not in logging order.
        """
        series = cls.from_records(_wandb_history_records(_find_wandb_file(Path(run_dir))))
        return series.reorder(sorted(series.names, key=_natural_key))

    def reorder(self, names: list[str]) -> RunSeries:
        """A copy with the tensors (columns) in the order of ``names`` (a permutation)."""
        if sorted(names) != sorted(self.names):
            raise ValueError("reorder() needs a permutation of the series' names")
        index = [self.names.index(name) for name in names]
        columns = {kind: getattr(self, kind)[:, index] for kind in PER_TENSOR_KINDS}
        return replace(self, names=list(names), **columns)

    @classmethod
    def from_tensorboard(cls, path: str | Path) -> RunSeries:
        """Build from TensorBoard event files: a ``events.out.tfevents.*`` file or the folder
        holding them (Lightning's ``TensorBoardLogger`` log dir).

        Read with ``tensorboard.backend.event_processing.event_accumulator`` (every scalar
        kept, no sampling). Values come back as float32, as TensorBoard stores them; steps are
        the ones the callback passed to ``log_metrics``.
        """
        from tensorboard.backend.event_processing import event_accumulator as ea

        path = Path(path)
        if path.is_dir() and not any(path.glob("events.out.tfevents.*")):
            raise FileNotFoundError(f"no TensorBoard event file (events.out.tfevents.*) in {path}")
        acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0})
        acc.Reload()
        rows: dict[int, dict[str, float]] = {}
        for tag in acc.Tags().get(ea.SCALARS, []):  # in order of first appearance
            for event in acc.Scalars(tag):
                rows.setdefault(int(event.step), {})[tag] = float(event.value)
        return cls.from_records((step, rows[step]) for step in sorted(rows))

    @classmethod
    def from_run_dir(cls, path: str | Path) -> RunSeries:
        """Build from the one run below ``path`` (see :func:`find_runs`), or from a log file.

        Raises:
            FileNotFoundError: no ``metrics.csv``, TensorBoard event file or ``.wandb`` file.
            MultipleRunsError: ``path`` holds several runs (the message lists them).
        """
        path = Path(path)
        if path.is_file():
            return RunSource(path.parent, kind_of_file(path), path).load()
        runs = find_runs(path)
        if not runs:
            raise FileNotFoundError(
                f"no metrics.csv, TensorBoard event file (events.out.tfevents.*) or .wandb run file below {path}"
            )
        if len(runs) > 1:
            raise MultipleRunsError(path, runs)
        return runs[0].load()


# ------------------------------------------------------------------ runs in a folder
_KIND_ORDER = ("csv", "tensorboard", "wandb")  # preferred source when a run has several


@dataclass(frozen=True)
class RunSource:
    """One run found below a folder: its ``root`` (the Hydra run dir, or the logger's own
    folder), the ``kind`` of log it is read from (``csv``, ``tensorboard``, ``wandb``) and the
    ``path`` of that log."""

    root: Path
    kind: str
    path: Path

    def load(self) -> RunSeries:
        """The :class:`RunSeries` of this run."""
        if self.kind == "csv":
            return RunSeries.from_csv(self.path)
        if self.kind == "tensorboard":
            return RunSeries.from_tensorboard(self.path)
        return RunSeries.from_wandb_offline(self.path)


class MultipleRunsError(ValueError):
    """A folder holds more than one run; ``runs`` lists them."""

    def __init__(self, path: Path, runs: list[RunSource]) -> None:
        self.runs = runs
        listing = "\n".join(f"  {run.root}  ({run.kind}: {run.path.relative_to(run.root)})" for run in runs)
        super().__init__(f"{path} holds {len(runs)} runs; pass one of them, or --all to report each:\n{listing}")


def kind_of_file(path: Path) -> str:
    if path.suffix == ".wandb":
        return "wandb"
    if path.name.startswith("events.out.tfevents."):
        return "tensorboard"
    return "csv"


def _run_root(folder: Path, top: Path) -> Path:
    """The Hydra run dir (``.hydra/`` or ``config_resolved.yaml``) holding ``folder``, not above
    ``top``; else ``folder`` itself (a W&B ``wandb/offline-run-*`` folder: its save dir)."""
    for candidate in (folder, *folder.parents):
        if (candidate / ".hydra").is_dir() or (candidate / "config_resolved.yaml").is_file():
            return candidate
        if candidate == top:
            break
    if folder.name.startswith(("offline-run-", "run-")) and folder.parent.name == "wandb" and folder.parent != top:
        return folder.parent.parent
    return folder


def find_runs(path: str | Path) -> list[RunSource]:
    """The runs below ``path``, one :class:`RunSource` each, sorted by root.

    Logs are ``metrics.csv`` files, folders of ``events.out.tfevents.*`` files and ``*.wandb``
    files. Logs under one Hydra run dir are one run (W&B rides with a CSV logger there); a run
    is read from its CSV, else TensorBoard, else W&B log, the newest if several of a kind.
    """
    top = Path(path)
    found: list[tuple[Path, str, Path]] = []
    found += [(p, "csv", p) for p in top.rglob("metrics.csv")]
    found += [(p.parent, "tensorboard", p.parent) for p in top.rglob("events.out.tfevents.*")]
    found += [(p.parent, "wandb", p) for p in top.rglob("*.wandb")]
    by_root: dict[Path, list[tuple[str, Path]]] = {}
    for folder, kind, log in found:
        folder = folder if folder.is_dir() else folder.parent
        entries = by_root.setdefault(_run_root(folder, top), [])
        if (kind, log) not in entries:
            entries.append((kind, log))
    runs = []
    for root, entries in sorted(by_root.items()):
        best = min(entries, key=lambda e: (_KIND_ORDER.index(e[0]), -e[1].stat().st_mtime))
        runs.append(RunSource(root, *best))
    return runs


# --------------------------------------------------------------- key parsing
def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _strip_logger_prefix(key: str) -> str | None:
    """``"smd/..."`` or ``"prefix-smd/..."`` → ``"smd/..."``; anything else → None."""
    if key.startswith("smd/"):
        return key
    at = key.find("-smd/")
    return key[at + 1 :] if at >= 0 else None


def _classify(key: str) -> tuple[str, str] | None:
    """Map a metric key to ``(group, sub)``: a per-tensor kind and the tensor name, or
    ``("angular_update_ratio", stat)``, ``("rescale_factor", "")``, ``("lr", key)`` or
    ``("extra", "smd/...")``; None for keys outside the schema."""
    smd = _strip_logger_prefix(key)
    if smd is None:
        match = _LR_KEY.match(key)
        if match and not any(word in key for word in _LR_EXCLUDE):
            return "lr", match.group(1)
        return None
    parts = smd.split("/", 2)
    if len(parts) == 3 and parts[1] in PER_TENSOR_KINDS:
        return parts[1], parts[2]
    if len(parts) == 3 and parts[1] == _RATIO_KIND:
        return _RATIO_KIND, parts[2]
    if smd == f"smd/{_RESCALE_KEY}":
        return _RESCALE_KEY, ""
    return "extra", smd


def _parse_keys(keys: Iterable[str]) -> dict[str, Any]:
    """Classify every distinct key once; collect tensor names in order of first appearance."""
    classified: dict[str, tuple[str, str]] = {}
    names: dict[str, None] = {}
    for key in keys:
        if key in classified:
            continue
        target = _classify(key)
        if target is None:
            continue
        classified[key] = target
        if target[0] in PER_TENSOR_KINDS:
            names.setdefault(target[1])
    return {"keys": classified, "names": list(names)}


def _has_smd_key(row: Mapping[str, float], classified: Mapping[str, tuple[str, str]]) -> bool:
    return any(classified.get(key, ("lr",))[0] != "lr" for key in row)


def _equilibrium_steps(extra: Mapping[str, np.ndarray]) -> dict[str, int | None]:
    """Last finite logged value of each ``smd/equilibrium_step/{name}`` series."""
    out: dict[str, int | None] = {}
    prefix = f"smd/{_EQUILIBRIUM_KIND}/"
    for key, values in extra.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        finite = values[np.isfinite(values)]
        out[name] = int(finite[-1]) if finite.size else None
    return out


def _as_float(value: Any) -> float | None:
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (TypeError, ValueError, RuntimeError):
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _merge_rows(records: Records) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for step, metrics in records:
        row = rows.setdefault(int(step), {})
        for key, value in metrics.items():
            number = _as_float(value)
            if number is not None:
                row[key] = number
    return rows


# ------------------------------------------------------------------ CSV
def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, float]]]:
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            if not step:
                continue
            values = {}
            for key, cell in row.items():
                if key is None or key == "step" or cell in (None, ""):
                    continue
                try:
                    values[key] = float(cell)
                except ValueError:
                    continue
            yield int(float(step)), values


# ------------------------------------------------------ W&B offline run file
_LEVELDB_BLOCK = 32 * 1024
_LEVELDB_HEADER = struct.Struct("<IHB")  # checksum, length, type
_FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _find_wandb_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.rglob("*.wandb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no .wandb run file below {path}")
    return files[-1]


def _leveldb_payloads(data: bytes) -> Iterator[bytes]:
    """Yield the records of a W&B transaction log (LevelDB log framing, W&B's checksums).

    The file opens with a 7-byte header; records are split into FULL / FIRST, MIDDLE…, LAST
    fragments, each with a 7-byte header, inside 32 KiB blocks whose tails shorter than a
    header are zero padding. Reading stops at the first corrupt or truncated fragment (a run
    that crashed mid-write keeps everything before it).
    """
    ident, magic, _ = _FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError("not a W&B run file (bad header)")
    pos, pending = _FILE_HEADER.size, None
    while pos + _LEVELDB_HEADER.size <= len(data):
        room = _LEVELDB_BLOCK - pos % _LEVELDB_BLOCK
        if room < _LEVELDB_HEADER.size:
            pos += room
            continue
        checksum, length, kind = _LEVELDB_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += room
            continue
        start = pos + _LEVELDB_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            return
        pos = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE and pending is not None:
            pending += chunk
        elif kind == _LAST and pending is not None:
            yield pending + chunk
            pending = None


def read_wandb_records(path: str | Path) -> Iterator[Any]:
    """Yield every ``wandb.proto.wandb_internal_pb2.Record`` of a ``.wandb`` run file.

    W&B's own reader is preferred where it exists, but 0.31 ships none: the Python
    ``wandb.sdk.internal.datastore`` of older releases is gone (the log is read by the Go
    ``wandb-core`` service, which has no Python API). So this is a small one, checked against
    real offline runs in tests/report/test_wandb.py. Needs ``wandb`` installed (for the protobuf classes).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    for payload in _leveldb_payloads(data):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _history_key(item: Any) -> str | None:
    if item.key:
        return item.key
    if len(item.nested_key) == 1:
        return item.nested_key[0]
    return None  # nested values (images, tables) are not series


def _wandb_history_records(path: Path) -> Iterator[tuple[int, dict[str, float]]]:
    for record in read_wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        metrics: dict[str, Any] = {}
        for item in record.history.item:
            key = _history_key(item)
            if key is None:
                continue
            try:
                metrics[key] = json.loads(item.value_json)
            except ValueError:
                continue
        step = metrics.pop("trainer/global_step", None)
        if isinstance(step, (int, float)) and not isinstance(step, bool):
            yield int(step), metrics
