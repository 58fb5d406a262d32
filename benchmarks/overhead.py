"""Overhead of SMDCallback on real Lightning training steps, side by side with a naive reference.

    python benchmarks/overhead.py                 # default: resnet18 32×32 and resnet50 64×64, SGD-M and AdamW
    python benchmarks/overhead.py --quick         # CI smoke test (< 60 s on a 2-core CPU)
    python benchmarks/overhead.py --models resnet18:32:32 --optimizers adamw --rounds 9
    python benchmarks/overhead.py --device cuda   # CUDA events instead of perf_counter

For each model and optimizer, nine variants train the same model on the same data with a real
``Trainer.fit`` and a real logger (``--logger csv``, the default, or ``tensorboard``; ``memory`` keeps
the metrics in memory); the fits are interleaved (A B C ..., B C ... A, ...) and repeated ``--rounds`` times:

* ``none``: no callback;
* ``smd_default``: ``SMDCallback()`` at its default cadence (the Trainer's ``log_every_n_steps``, 50),
  per-channel statistics on every measured step (the default);
* ``smd_every``: ``SMDCallback(log_every_n_steps=1)``, measuring every step, per-channel on;
* ``smd_default_tensor``, ``smd_every_tensor``: the same with ``per_channel=False`` (per-tensor
  statistics only); side by side they give the cost of the per-channel statistics (the per-channel table);
* the peers, every step: ``naive_every`` (``benchmarks/naive_reference.py``: clone + acos +
  ``.item()`` per tensor), ``cvpods_every`` and ``req_every`` (``benchmarks/peers.py``: the first-order
  ‖Δw‖/‖w‖ from a kept copy with one ``.item()`` per parameter; REQ-style per-neuron rotation from
  clones taken before the step);
* ``none_again``: no callback again: its "overhead" over ``none`` (an A/A comparison) is the
  run-to-run noise of whole fits on this machine, the resolution of the end-to-end figures.

A step is timed from the first callback's ``on_train_batch_start`` to the last callback's
``on_train_batch_end`` (forward, backward, optimizer step and every hook; not data loading), on CPU
with ``time.perf_counter``, on CUDA with CUDA events. The first ``--warmup`` steps of every fit
(the detection steps of SMDCallback among them) are not timed.

Statistics: per fit the mean step time (total time over steps: what throughput sees, including
the steps that also sample the unit gradient); per round the overhead of a variant is its mean over
that of ``none`` in the same round; reported are the medians over rounds and their IQR. The default
cadence measures one step in 50: its step time is amortized as ``((E−1)·U + M)/E`` with ``U`` the
mean unmeasured step of the ``smd_default`` fit and ``M`` the mean (measured) step of the
``smd_every`` fit of the same round (``smd_default_tensor`` is amortized with ``smd_every_tensor``), ``E`` = 50. The callback's *self time* (wall time spent inside
its hooks, amortized the same way) is reported too: on CPU, where everything is synchronous, it is
the callback's cost without the run-to-run noise of whole steps.

Allocator: on Linux/glibc the benchmark first pins malloc's mmap threshold (32 MiB) and trim
threshold (1 GiB) with ``mallopt`` (``--malloc default`` leaves glibc alone). With glibc's dynamic
thresholds, whether a step's large temporaries (AdamW's on CPU) come from already-mapped heap pages or
from freshly faulted ones depends on the heap's history: the same fit then runs at 60 or 90 ms per
step, with or without a callback, as thousands of page faults per step come and go. The minor page
faults per step are reported for every variant, so the steady state can be checked.

Memory: "persistent" is the exact number of bytes of the tensors the callback holds between steps
(found by walking the callback object; parameters, gradients and optimizer state excluded), next
to the size of the tracked tensors. On CUDA the peak of ``torch.cuda.max_memory_allocated`` over
the fit is reported as well. (On CPU, tracemalloc does not see torch's allocations and the process
RSS peak is not attributable to one fit, so no CPU peak is reported.)
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root, for lightning_smd without installing it
sys.path.insert(0, str(HERE))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import Logger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_smd import SMDCallback  # noqa: E402
from naive_reference import NaiveAngularUpdate  # noqa: E402
from peers import CvpodsStyleMonitor, ReqStylePerNeuronMonitor  # noqa: E402

VARIANTS = ("none", "smd_default", "smd_default_tensor", "smd_every", "smd_every_tensor",
            "naive_every", "cvpods_every", "req_every", "none_again")
WITH_CALLBACK = ("smd_default", "smd_default_tensor", "smd_every", "smd_every_tensor",
                 "naive_every", "cvpods_every", "req_every")
PEERS = ("naive_every", "cvpods_every", "req_every")
SMD_VARIANTS = {  # SMDCallback arguments per variant (per_channel=True, the default: units on every measured step)
    "smd_default": {},
    "smd_default_tensor": {"per_channel": False},
    "smd_every": {"log_every_n_steps": 1},
    "smd_every_tensor": {"log_every_n_steps": 1, "per_channel": False},
}
# default-cadence variant → the every-step variant whose (measured) step it is amortized with
AMORTIZED = {"smd_default": "smd_every", "smd_default_tensor": "smd_every_tensor"}
TRAINER_LOG_EVERY = 50  # Trainer's default log_every_n_steps: the callback's default cadence
# Targets of issue 25, for resnet18 at 32×32, batch 32, on a 2-core CPU: end to end every step,
# self time at the default cadence
TARGETS = {("smd_default", "sgdm"): 0.3, ("smd_default", "adamw"): 0.3,
           ("smd_every", "sgdm"): 5.0, ("smd_every", "adamw"): 6.0}
# Per-channel bars, added self time over the per-tensor variant, % of the `none` step
PER_CHANNEL_TARGETS = {"default": 0.5, "every": 1.0}
PEER_FACTOR = 2.5  # the callback (every step) at least this many times cheaper than the cheapest peer
#: the clock of step and hook times: wall time (perf_counter), or ``--clock cpu``: the process's CPU time
#: (process_time), which a machine shared with other jobs does not inflate by descheduling
CLOCK = {"fn": time.perf_counter}
# the Lightning hooks, and SMDCallback's torch step hooks (its measurement runs inside optimizer.step())
HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
         "on_before_zero_grad", "on_train_batch_end", "_before_step", "_after_step")


# ----------------------------------------------------------------------------- model and data
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    image: int
    batch: int

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        name, image, batch = (text.split(":") + ["", ""])[:3]
        return cls(name, int(image or 32), int(batch or 32))

    def __str__(self) -> str:
        return f"{self.name} {self.image}×{self.image} b{self.batch}"


class BenchModule(pl.LightningModule):
    def __init__(self, spec: ModelSpec, optimizer: str, num_batches: int = 16) -> None:
        super().__init__()
        import torchvision

        torch.manual_seed(0)
        self.model = getattr(torchvision.models, spec.name)(num_classes=10)
        self.optimizer_name = optimizer
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(num_batches * spec.batch, 3, spec.image, spec.image, generator=gen)
        self.y = torch.randint(0, 10, (num_batches * spec.batch,), generator=gen)
        self.batch = spec.batch

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "sgdm":
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.05)
        raise ValueError(f"unknown optimizer {self.optimizer_name!r}")

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch, shuffle=False, drop_last=True)


class MemoryLogger(Logger):
    """Keeps the last metrics in memory: the logging path runs, no I/O noise."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.last: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls += 1
        self.last = dict(metrics)


class BenchSMDCallback(SMDCallback):
    """SMDCallback without the figures it renders at the end of fit (outside the timed steps anyway)."""

    def _render_figures(self, *args, **kwargs):
        return {}


# ----------------------------------------------------------------------------- timing
class StepClock:
    """Per-step wall time (perf_counter, or CUDA events) and the time spent in the timed callback's hooks."""

    def __init__(self, cuda: bool, warmup: int) -> None:
        self.cuda = cuda
        self.warmup = warmup
        self.steps: list[tuple[int, Any, Any]] = []  # (batch_idx, start, end)
        self.hook_time: dict[int, float] = {}
        self.page_faults: list[int] = []  # minor page faults of the process per timed step
        self._start: Any = None
        self._faults = 0
        self._batch = -1

    def now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return CLOCK["fn"]()

    def start(self, batch_idx: int) -> None:
        self._batch = batch_idx
        self._start = self.now() if batch_idx >= self.warmup else None
        self._faults = _minor_faults()

    def end(self) -> None:
        if self._start is not None:
            self.steps.append((self._batch, self._start, self.now()))
            self.page_faults.append(_minor_faults() - self._faults)
            self._start = None

    def add_hook_time(self, seconds: float) -> None:
        if self._batch >= self.warmup:
            self.hook_time[self._batch] = self.hook_time.get(self._batch, 0.0) + seconds

    def times(self) -> dict[int, float]:
        """batch_idx → step time in seconds."""
        if self.cuda:
            torch.cuda.synchronize()
            return {b: s.elapsed_time(e) / 1e3 for b, s, e in self.steps}
        return {b: e - s for b, s, e in self.steps}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def pin_malloc() -> str:
    """Fix glibc's mmap/trim thresholds (see the module docstring); returns what was done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) == 1 and libc.mallopt(m_trim_threshold, 2**30) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc mallopt: mmap threshold 32 MiB, trim threshold 1 GiB" if ok else "default (mallopt unavailable)"


class _ClockStart(pl.Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.start(trainer.fit_loop.epoch_loop._batches_that_stepped)


class _ClockEnd(pl.Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.end()


def _time_hooks(callback: pl.Callback, clock: StepClock) -> None:
    """Wrap the callback's hooks (instance attributes) to add their wall time to ``clock``."""
    for name in HOOKS:
        fn = getattr(callback, name, None)
        if fn is None:
            continue

        def timed(*args, __fn=fn, **kwargs):
            t0 = CLOCK["fn"]()
            try:
                return __fn(*args, **kwargs)
            finally:
                clock.add_hook_time(CLOCK["fn"]() - t0)

        setattr(callback, name, timed)


# ----------------------------------------------------------------------------- memory
def _owned_storages(module: nn.Module, optimizers) -> set[int]:
    ptrs = set()
    for t in list(module.parameters()) + list(module.buffers()):
        ptrs.add(t.untyped_storage().data_ptr())
        if t.grad is not None:
            ptrs.add(t.grad.untyped_storage().data_ptr())
    for opt in optimizers:
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    ptrs.add(v.untyped_storage().data_ptr())
    return ptrs


def persistent_tensor_bytes(obj: Any, exclude: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` that are not in ``exclude``."""
    seen_obj: set[int] = set()
    storages: dict[int, int] = {}
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen_obj or isinstance(o, (str, bytes, int, float, bool, type(None), type)):
            continue
        seen_obj.add(id(o))
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            if s.data_ptr() not in exclude and s.nbytes():
                storages[s.data_ptr()] = s.nbytes()
            continue
        if isinstance(o, (pl.Trainer, nn.Module, torch.optim.Optimizer, Logger)):
            continue
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif dataclasses.is_dataclass(o) or hasattr(o, "__dict__"):
            stack.extend(vars(o).values() if hasattr(o, "__dict__") else ())
            for slot in getattr(type(o), "__slots__", ()):
                if hasattr(o, slot):
                    stack.append(getattr(o, slot))
    return sum(storages.values())


def host_object_bytes(obj: Any) -> int:
    """Approximate deep size (sys.getsizeof) of plain Python containers/numbers/strings."""
    seen: set[int] = set()
    total = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set)):
            stack.extend(o)
        elif hasattr(o, "__dict__") and not isinstance(o, type):  # e.g. lightning_smd.report.history.History
            stack.append(vars(o))
    return total


# ----------------------------------------------------------------------------- one fit
def make_logger(kind: str, root: str) -> Logger:
    """The logger every variant (``none`` included) trains with: a real CSV or TensorBoard one by
    default, so building and writing the metrics is counted; ``memory`` keeps them in memory."""
    if kind == "csv":
        return pl.loggers.CSVLogger(root, name="bench")
    if kind == "tensorboard":
        return pl.loggers.TensorBoardLogger(root, name="bench")
    return MemoryLogger()


def run_fit(spec: ModelSpec, optimizer: str, variant: str, steps: int, warmup: int, device: str,
            logger: str = "csv") -> dict[str, Any]:
    import shutil
    import tempfile

    cuda = device == "cuda"
    log_root = tempfile.mkdtemp(prefix="smd_bench_")
    module = BenchModule(spec, optimizer)
    clock = StepClock(cuda, warmup)
    callback: pl.Callback | None = None
    if variant in SMD_VARIANTS:
        callback = BenchSMDCallback(verbose=False, **SMD_VARIANTS[variant])
    elif variant == "naive_every":
        callback = NaiveAngularUpdate(every=1)
    elif variant == "cvpods_every":
        callback = CvpodsStyleMonitor(every=1)
    elif variant == "req_every":
        callback = ReqStylePerNeuronMonitor(every=1)
    callbacks: list[pl.Callback] = [_ClockStart(clock)]
    if callback is not None:
        _time_hooks(callback, clock)
        callbacks.append(callback)
    callbacks.append(_ClockEnd(clock))
    trainer = pl.Trainer(
        max_steps=warmup + steps,
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        logger=make_logger(logger, log_root),
        callbacks=callbacks,
        log_every_n_steps=TRAINER_LOG_EVERY,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_epochs=-1,
        deterministic=False,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    trainer.fit(module)
    times = clock.times()
    out: dict[str, Any] = {"times": times, "hook": dict(clock.hook_time), "page_faults": clock.page_faults}
    if cuda:
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base_alloc
    if callback is not None:
        exclude = _owned_storages(module, trainer.optimizers)
        out["persistent_bytes"] = persistent_tensor_bytes(callback, exclude)
        if isinstance(callback, SMDCallback):
            measurer = callback._measurer
            tracked = [p for s in measurer.slices for p in s.params] if measurer else []
            out["tracked_bytes"] = sum(p.numel() * p.element_size() for p in tracked)
            out["tracked"] = len(tracked)
            out["modes"] = sorted({s.mode for s in measurer.slices}) if measurer else []
            # formed after the step and freed (Adam's m/(√v+ε'), Nesterov's g+μb, Lion's sign, a snapshot)
            out["transient_bytes"] = sum(p.numel() * 4 for s in (measurer.slices if measurer else [])
                                         if s.mode not in ("buffer", "grad") for p in s.params)
            out["records"] = len(callback.records)
            first = min((step for step, _ in callback.records), default=None)
            if variant == "smd_every" and steps > 2 and (first is None or first > warmup):
                print(f"  warning: detection finished after the warm-up (first measured step {first}, "
                      f"warm-up {warmup}): increase --warmup", flush=True)
            out["records_bytes"] = host_object_bytes(callback.records)
        else:
            out["tracked_bytes"] = sum(p.numel() * p.element_size() for _, p in callback.params)
            out["tracked"] = len(callback.params)
    del trainer, module, callback
    shutil.rmtree(log_root, ignore_errors=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- statistics
def _median(xs):
    return statistics.median(xs) if xs else math.nan


def _mean(xs):
    return statistics.fmean(xs) if xs else math.nan


def _quartiles(xs):
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (math.nan, math.nan)
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def summarize(rounds: list[dict[str, dict]], every: int) -> dict[str, Any]:
    """Per-round step times (s) per variant, amortizing the default cadence; overheads in %."""
    per_round: dict[str, list[float]] = {v: [] for v in VARIANTS}
    self_time: dict[str, list[float]] = {v: [] for v in WITH_CALLBACK}
    measured_default: list[float] = []
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    faults: dict[str, list[int]] = {v: [] for v in VARIANTS}
    for r in rounds:
        med = {}
        for v in VARIANTS:
            times = r[v]["times"]
            samples[v].extend(times.values())
            faults[v].extend(r[v].get("page_faults", []))
            if v in AMORTIZED:
                unmeasured = [t for b, t in times.items() if (b + 1) % every != 0]
                if v == "smd_default":
                    measured_default.extend(t for b, t in times.items() if (b + 1) % every == 0)
                med[v] = _mean(unmeasured)
            else:
                med[v] = _mean(list(times.values()))
            if v in WITH_CALLBACK:
                hooks = r[v]["hook"]
                if v in AMORTIZED:
                    self_u = _mean([h for b, h in hooks.items() if (b + 1) % every != 0] or [0.0])
                    self_m = _mean(list(r[AMORTIZED[v]]["hook"].values()))
                    self_time[v].append(((every - 1) * self_u + self_m) / every)
                else:
                    self_time[v].append(_mean(list(hooks.values())))
        # amortize: one measured step (cost as in the every-step fit) per `every` steps
        for v, measured in AMORTIZED.items():
            med[v] = ((every - 1) * med[v] + med[measured]) / every
        for v in VARIANTS:
            per_round[v].append(med[v])
    base = per_round["none"]
    result: dict[str, Any] = {"variants": {}}
    for v in VARIANTS:
        entry = {
            "step_ms_median": 1e3 * _median(per_round[v]),
            "step_ms_rounds": [1e3 * t for t in per_round[v]],
            "step_ms_iqr_samples": [1e3 * q for q in _quartiles(samples[v])],
            "page_faults_per_step_median": _median(faults[v]),
        }
        if v != "none":
            overhead = [100.0 * (t / b - 1.0) for t, b in zip(per_round[v], base)]
            entry["overhead_pct_median"] = _median(overhead)
            entry["overhead_pct_iqr"] = list(_quartiles(overhead))
            entry["overhead_pct_rounds"] = overhead
        if v in WITH_CALLBACK:
            self_pct = [100.0 * s / b for s, b in zip(self_time[v], base)]
            entry["self_ms_median"] = 1e3 * _median(self_time[v])
            entry["self_pct_median"] = _median(self_pct)
            first = rounds[0][v]
            for key in ("persistent_bytes", "tracked_bytes", "tracked", "modes", "records", "records_bytes", "transient_bytes",
                        "cuda_peak_bytes"):
                if key in first:
                    entry[key] = first[key]
        if "cuda_peak_bytes" in rounds[0][v]:
            entry["cuda_peak_bytes"] = rounds[0][v]["cuda_peak_bytes"]
        result["variants"][v] = entry
    if measured_default:
        result["variants"]["smd_default"]["measured_step_ms_median"] = 1e3 * _median(measured_default)
    return result


# ----------------------------------------------------------------------------- report
def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "python": platform.python_version(),
        "device": device,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return info


def _fmt_mib(n: int | None) -> str:
    if n is None:
        return "–"
    if n < 2**20:
        return "0" if n == 0 else f"{n / 1024:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


def _fmt_pct(x: float) -> str:
    return f"{x:+.1f} %"


def render(info: dict[str, Any], results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["# SMDCallback overhead", ""]
    machine = f"{info['cpu']}, {info['cores']} cores, torch.set_num_threads({info['torch_threads']})"
    if "gpu" in info:
        machine = f"{info['gpu']} (host: {machine})"
    lines.append(f"- machine: {machine}")
    lines.append(f"- torch {info['torch']}, torchvision {info.get('torchvision', '?')}, "
                 f"pytorch_lightning {info['pytorch_lightning']}, Python {info['python']}; {info['date']}")
    if "load_average_start" in info:
        la0 = ", ".join(f"{x:.2f}" for x in info["load_average_start"])
        la1 = ", ".join(f"{x:.2f}" for x in info.get("load_average_end", ()))
        lines.append(f"- load average (1, 5, 15 min) at start: {la0}; at end: {la1}")
    lines.append(f"- command: `{' '.join(['python benchmarks/overhead.py', *args.argv])}`; clock: "
                 f"{'CPU time of the process (time.process_time)' if args.clock == 'cpu' else 'wall (perf_counter)' if info['device'] == 'cpu' else 'CUDA events'}; "
                 f"logger: {args.logger}")
    plan = "; ".join(sorted({f"{r['model']}: {r['rounds']} rounds × {r['warmup']} untimed + {r['steps']} timed steps"
                             for r in results}))
    lines.append(f"- {len(VARIANTS)} variants interleaved per round ({plan}); the untimed warm-up steps include "
                 f"detection; default cadence = one measured step in {TRAINER_LOG_EVERY}, amortized")
    lines.append("")
    lines.append(f"- allocator: {info.get('malloc', 'default')}; minor page faults per step (median), "
                 "none / default / every / naive: " + "; ".join(
                     f"{r['model']} {r['optimizer']}: " + " / ".join(
                         f"{r['variants'][v].get('page_faults_per_step_median', math.nan):.0f}" for v in ("none", *WITH_CALLBACK))
                     for r in results))
    lines.append("")
    lines.append("Step time: median over rounds of the per-fit mean step time (ms). Overhead: median over rounds "
                 "of the step time relative to `none` of the same round, [IQR]. Self: time spent inside the "
                 "callback's hooks per step, as % of the `none` step.")
    lines.append("")
    lines.append("| model | optimizer | SMD mode | none (ms) | A/A noise (`none` again) | SMD default cadence | "
                 "SMD every step | naive every step | target default / every | met: end to end (self) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        v = res["variants"]

        def cell(name):
            e = v[name]
            lo, hi = e["overhead_pct_iqr"]
            return (f"{e['step_ms_median']:.1f} ms, {_fmt_pct(e['overhead_pct_median'])} "
                    f"[{lo:+.1f}, {hi:+.1f}]; self {e['self_pct_median']:.2f} %")

        key_default = TARGETS.get(("smd_default", res["optimizer"]))  # self time
        key_every = TARGETS.get(("smd_every", res["optimizer"]))  # end to end
        applies = res["model"].startswith("resnet18 32×32 b32") and info["device"] == "cpu"
        if applies and key_default is not None:
            target = f"self ≤ {key_default:g} % / ≤ {key_every:g} %"
            def verdict(name, target):
                return "yes" if v[name]["overhead_pct_median"] <= target else "NO"

            def verdict_self(name, target):
                return "yes" if v[name]["self_pct_median"] <= target else "NO"

            met = (f"{verdict_self('smd_default', key_default)} / {verdict('smd_every', key_every)} "
                   f"(every step, self: {verdict_self('smd_every', key_every)})")
        else:
            target, met = "–", "–"
        aa = v["none_again"]
        noise = f"{_fmt_pct(aa['overhead_pct_median'])} [{aa['overhead_pct_iqr'][0]:+.1f}, {aa['overhead_pct_iqr'][1]:+.1f}]"
        lines.append(f"| {res['model']} | {res['optimizer']} | {', '.join(v['smd_every'].get('modes', []))} | "
                     f"{v['none']['step_ms_median']:.1f} | {noise} | {cell('smd_default')} | {cell('smd_every')} | "
                     f"{cell('naive_every')} | {target} | {met} |")
    lines.append("")
    lines.extend(_per_channel_table(info, results))
    lines.extend(_peer_table(info, results))
    lines.append("Memory the callback holds between steps (exact: bytes of the tensors reachable from the "
                 "callback object, parameters/gradients/optimizer state excluded), next to the size of the "
                 "tracked tensors; host: the Python records of logged values (`SMDCallback.records`) at the end "
                 "of the fit.")
    lines.append("")
    header = "| model | optimizer | tracked tensors | SMD default: persistent | SMD every step: persistent | " \
             "naive: persistent (transient: one clone per step) | SMD every step: host records |"
    if info["device"] == "cuda":
        header += " CUDA peak none / default / every / naive |"
    lines.append(header)
    lines.append("|" + "---|" * (header.count("|") - 1))
    for res in results:
        v = res["variants"]
        e = v["smd_every"]
        records = e.get("records", 0)
        per = e.get("records_bytes", 0) / records if records else 0
        row = (f"| {res['model']} | {res['optimizer']} | {e.get('tracked', 0)} ({_fmt_mib(e.get('tracked_bytes'))}) | "
               f"{_fmt_mib(v['smd_default'].get('persistent_bytes'))} | {_fmt_mib(e.get('persistent_bytes'))} | "
               f"{_fmt_mib(v['naive_every'].get('persistent_bytes'))} | "
               f"{e.get('records_bytes', 0) / 1024:.0f} KiB for {records} steps ({per / 1024:.1f} KiB/step) |")
        if info["device"] == "cuda":
            row += " " + " / ".join(_fmt_mib(v[k].get("cuda_peak_bytes")) for k in ("none", *WITH_CALLBACK)) + " |"
        lines.append(row)
    lines.append("")
    return "\n".join(lines)


def _per_channel_table(info: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """Per-channel statistics on vs off: self time (and end to end) per step, % of the `none` step."""
    lines = [
        "Per-channel statistics on vs off (`per_channel=False` / the default `per_channel=True`, which measures the "
        "units on every measured step): self time per step, % of the `none` step (median over rounds); "
        "*added* = per-channel minus per-tensor.",
        "",
        "| model | optimizer | default cadence: per-tensor | default cadence: per-channel | added (bar) | "
        "every step: per-tensor | every step: per-channel | added (bar) | end to end every step: per-tensor / "
        "per-channel | met: default / every |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        v = res["variants"]
        self_pct = {name: v[name]["self_pct_median"] for name in SMD_VARIANTS}
        added_default = self_pct["smd_default"] - self_pct["smd_default_tensor"]
        added_every = self_pct["smd_every"] - self_pct["smd_every_tensor"]
        applies = res["model"].startswith("resnet18 32×32 b32") and info["device"] == "cpu"
        met = (f"{'yes' if added_default <= PER_CHANNEL_TARGETS['default'] else 'NO'} / "
               f"{'yes' if added_every <= PER_CHANNEL_TARGETS['every'] else 'NO'}") if applies else "–"
        lines.append(
            f"| {res['model']} | {res['optimizer']} | {self_pct['smd_default_tensor']:.2f} % | "
            f"{self_pct['smd_default']:.2f} % | {added_default:+.2f} % (≤ {PER_CHANNEL_TARGETS['default']:g} %) | "
            f"{self_pct['smd_every_tensor']:.2f} % | {self_pct['smd_every']:.2f} % | "
            f"{added_every:+.2f} % (≤ {PER_CHANNEL_TARGETS['every']:g} %) | "
            f"{_fmt_pct(v['smd_every_tensor']['overhead_pct_median'])} / "
            f"{_fmt_pct(v['smd_every']['overhead_pct_median'])} | {met} |")
    lines.append("")
    return lines


def _peer_table(info: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """SMDCallback every step beside the peers: end to end, self time, memory, and how much cheaper."""
    names = {"smd_every": "SMDCallback (per-channel on)", "naive_every": "naive (clone + acos, .item() per tensor)",
             "cvpods_every": "cvpods-style (‖Δw‖/‖w‖, kept copy, .item() per tensor)",
             "req_every": "REQ-style per-neuron (clones before the step)"}
    lines = [
        "Peers, every step, same interleaved rounds (`benchmarks/peers.py`, `benchmarks/naive_reference.py`): "
        "overhead end to end [IQR], self time (% of the `none` step), memory held between steps / "
        "transient per step. *× cheaper*: the cheapest peer's self time over SMDCallback's (bar ≥ "
        f"{PEER_FACTOR:g}×).",
        "",
        "| model | optimizer | monitor | end to end | self | held between steps | transient per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        v = res["variants"]
        tracked = v["smd_every"].get("tracked_bytes")
        for name in ("smd_every", *PEERS):
            e = v[name]
            lo, hi = e["overhead_pct_iqr"]
            transient = {"smd_every": _fmt_mib(e.get("transient_bytes")), "naive_every": _fmt_mib(e.get("tracked_bytes")),
                         "cvpods_every": "–", "req_every": _fmt_mib(e.get("tracked_bytes"))}[name]
            lines.append(f"| {res['model']} | {res['optimizer']} | {names[name]} | "
                         f"{_fmt_pct(e['overhead_pct_median'])} [{lo:+.1f}, {hi:+.1f}] | {e['self_pct_median']:.2f} % | "
                         f"{_fmt_mib(e.get('persistent_bytes'))} | {transient} |")
        cheapest = min(v[p]["self_pct_median"] for p in PEERS)
        factor = cheapest / v["smd_every"]["self_pct_median"] if v["smd_every"]["self_pct_median"] > 0 else math.inf
        lines.append(f"| {res['model']} | {res['optimizer']} | **SMDCallback × cheaper than the cheapest peer (self)** | "
                     f"| **{factor:.1f}×** ({'yes' if factor >= PEER_FACTOR else 'NO'}) | "
                     f"tracked: {_fmt_mib(tracked)} | |")
    lines.append("")
    return lines


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke test: resnet18 only, 2 short rounds (< 60 s)")
    p.add_argument("--models", nargs="+", help="name:image:batch, torchvision names "
                   "(default CPU: resnet18:32:32 resnet50:64:32; CUDA: resnet18:32:32 resnet50:224:64)")
    p.add_argument("--optimizers", nargs="+", default=["sgdm", "adamw"], choices=["sgdm", "adamw"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", type=int, help="interleaved repetitions (default 7; models other than resnet18 "
                   "on CPU 3; quick 2)")
    p.add_argument("--steps", type=int, help="timed steps per fit (default 40; others on CPU 6; quick 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per fit, detection included "
                   "(default 10; others on CPU and quick 6)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count())")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: perf_counter; cpu: the process's CPU time (robust to other jobs on a shared machine; "
                        "use with --threads 1)")
    p.add_argument("--logger", default="csv", choices=["csv", "tensorboard", "memory"],
                   help="the logger of every fit (default: a real CSVLogger, so logging is counted)")
    p.add_argument("--malloc", default="pinned", choices=["pinned", "default"],
                   help="pin glibc's malloc thresholds first (default; see the module docstring) or not")
    p.add_argument("--out", default=str(HERE / "results.md"), help="Markdown output ('' to skip); JSON next to it")
    args = p.parse_args(argv)
    args.argv = argv

    if args.clock == "cpu":
        CLOCK["fn"] = time.process_time
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*weight_decay=0.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    if args.models:
        specs = [ModelSpec.parse(m) for m in args.models]
    elif args.quick:
        specs = [ModelSpec("resnet18", 32, 32)]
    elif args.device == "cuda":
        specs = [ModelSpec("resnet18", 32, 32), ModelSpec("resnet50", 224, 64)]
    else:
        specs = [ModelSpec("resnet18", 32, 32), ModelSpec("resnet50", 64, 32)]

    info = machine_info(args.device)
    info["malloc"] = pin_malloc() if args.malloc == "pinned" else "default (glibc dynamic thresholds)"
    print(f"# {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, torch {info['torch']}, "
          f"load {info.get('load_average_start')}", flush=True)
    t_start = time.perf_counter()
    results = []
    for spec in specs:
        heavy = args.device == "cpu" and spec.name not in ("resnet18",)
        rounds = args.rounds or (2 if args.quick else 3 if heavy else 7)
        steps = args.steps or (10 if args.quick else 6 if heavy else 40)
        warmup = args.warmup if args.warmup is not None else (6 if args.quick or heavy else 10)
        for opt in args.optimizers:
            run_fit(spec, opt, "smd_every", 2, 1, args.device, args.logger)  # process warm-up: kernels, allocator
            rounds_data = []
            for r in range(rounds):
                order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
                data = {v: run_fit(spec, opt, v, steps, warmup, args.device, args.logger) for v in order}
                rounds_data.append(data)
                meds = {v: 1e3 * _mean(list(data[v]["times"].values())) for v in VARIANTS}
                print(f"  {spec} {opt} round {r + 1}/{rounds}: " +
                      ", ".join(f"{v} {meds[v]:.1f} ms" for v in VARIANTS) +
                      f"  [{time.perf_counter() - t_start:.0f} s]", flush=True)
            res = summarize(rounds_data, TRAINER_LOG_EVERY)
            res.update(model=str(spec), optimizer=opt, rounds=rounds, steps=steps, warmup=warmup)
            results.append(res)
    try:
        info["load_average_end"] = os.getloadavg()
    except OSError:
        pass
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    text = render(info, results, args)
    text += f"\nTotal benchmark wall time: {info['wall_s']:.0f} s.\n"
    print()
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"machine": info, "results": results}, indent=1, default=str))
        print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
