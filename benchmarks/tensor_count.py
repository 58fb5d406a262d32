"""Is the cost of a measured step flat in the number of tracked tensors? Same total size, 10 to 3000 tensors.

    python benchmarks/tensor_count.py                          # 10, 100, 1000, 3000 tensors, SGD-M and AdamW
    python benchmarks/tensor_count.py --counts 10 3000 --reps 5 --threads 2

The model is an MLP of ``T`` residual blocks ``x + relu(BatchNorm1d(Linear(d, d, bias=False)(x)))`` with
``d = round(sqrt(P / T))``, so the ``T`` tracked ``Linear`` weights hold ``P`` = 3,072,000 parameters
(± rounding) whatever ``T``: only the tensor count changes. Every output feature is an invariance
unit (it feeds a BatchNorm1d), so the per-channel statistics are on, as by default.

Two figures per ``T`` and optimizer, after 3 untimed repetitions:

* **measurement**: ``StepMeasurer.before_step`` + ``after_step`` + the one device→host copy,
  around a real optimizer step (not timed), mean over ``--reps`` steps of which one in 8 samples
  the unit gradient (the callback's default): the tensor work of a measured step;
* **callback self time**: the wall time inside ``SMDCallback``'s hooks per step in a real
  ``Trainer.fit`` measuring every step (``log_every_n_steps=1``), warm-up steps (detection) untimed:
  what a user pays, including building and logging the metric dict (a few keys per tensor: that part
  necessarily grows with the tensor count).

Writes ``benchmarks/results_tensor_count.md``/``.json`` and ``benchmarks/tensor_count.png`` (``--out
DIR/results_X.md``: ``DIR/X.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_smd.core.measure import GroupSlice, StepMeasurer, measurement_mode  # noqa: E402
from overhead import CLOCK, BenchSMDCallback, MemoryLogger, StepClock, _ClockEnd, _ClockStart, _time_hooks, machine_info, pin_malloc  # noqa: E402

TOTAL = 3_072_000
OPTIMIZERS = {
    "sgdm": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
}


class Blocks(nn.Module):
    def __init__(self, count: int) -> None:
        super().__init__()
        self.width = d = max(2, round(math.sqrt(TOTAL / count)))
        self.linears = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(count))
        self.norms = nn.ModuleList(nn.BatchNorm1d(d) for _ in range(count))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        for lin, bn in zip(self.linears, self.norms):
            x = x + torch.relu(bn(lin(x)))
        return self.head(x)


class BlocksModule(pl.LightningModule):
    def __init__(self, count: int, optimizer: str, batch: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Blocks(count)
        self.optimizer_name = optimizer
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(8 * batch, self.model.width, generator=gen)
        self.y = torch.randint(0, 10, (8 * batch,), generator=gen)
        self.batch = batch

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer_name](self.parameters())

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch, drop_last=True)


def measurement_ms(count: int, optimizer: str, reps: int) -> float:
    """Mean ms of before_step + after_step + the host copy around real optimizer steps, the unit
    gradient sampled on one step in 8 as the callback does by default."""
    module = BlocksModule(count, optimizer)
    model = module.model
    opt = OPTIMIZERS[optimizer](model.parameters())
    tracked = [lin.weight for lin in model.linears]
    measurer = StepMeasurer([GroupSlice(opt, 0, tracked, 0, measurement_mode(opt, opt.param_groups[0]),
                                        units=[w.shape[0] for w in tracked])])
    x, y = module.x[:32], module.y[:32]
    times = []
    clock = CLOCK["fn"]
    for i in range(reps + 3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        t0 = clock()
        measurer.before_step(unit_grad=i % 8 == 0)  # the callback's default: L sampled 1 measured step in 8
        t1 = clock()
        opt.step()
        t2 = clock()
        stats, _ = measurer.after_step()
        stats.cpu()
        t3 = clock()
        if i >= 3:
            times.append((t1 - t0) + (t3 - t2))
    return 1e3 * statistics.fmean(times)


def callback_self_ms(count: int, optimizer: str, steps: int, warmup: int) -> tuple[float, float]:
    """(median self ms per step of SMDCallback measuring every step, median step ms) in a real fit."""
    module = BlocksModule(count, optimizer)
    clock = StepClock(False, warmup)
    callback = BenchSMDCallback(verbose=False, log_every_n_steps=1)
    _time_hooks(callback, clock)
    trainer = pl.Trainer(max_steps=warmup + steps, accelerator="cpu", devices=1, logger=MemoryLogger(),
                         callbacks=[_ClockStart(clock), callback, _ClockEnd(clock)], log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, max_epochs=-1)
    trainer.fit(module)
    tracked = len(callback._tracked.names) if callback._tracked is not None else 0
    if tracked != count:
        print(f"  warning: {tracked} tensors tracked, {count} expected", flush=True)
    hook = list(clock.hook_time.values())
    return 1e3 * statistics.median(hook), 1e3 * statistics.median(clock.times().values())


def render(info: dict, rows: list[dict], argv: list[str]) -> str:
    lines = ["# Cost of a measured step against the number of tracked tensors (same total size)", "",
             f"- machine: {info['cpu']}, {info['cores']} cores, torch.set_num_threads({info['torch_threads']}); "
             f"torch {info['torch']}; {info['date']}",
             f"- load average (1, 5, 15 min) at start: {', '.join(f'{x:.2f}' for x in info.get('load_average_start', ()))}; "
             f"at end: {', '.join(f'{x:.2f}' for x in info.get('load_average_end', ()))}",
             f"- command: `python benchmarks/tensor_count.py {' '.join(argv)}`",
             f"- clock: {'CPU time of the process (time.process_time)' if CLOCK['fn'] is time.process_time else 'wall (perf_counter)'}",
             f"- model: T residual blocks Linear(d, d, bias=False) → BatchNorm1d → ReLU, d = round(√({TOTAL:,}/T)); "
             "per-channel statistics on (one unit per output feature)", "",
             "Measurement: before_step + after_step + host copy (ms, mean; L sampled 1 step in 8). Callback self time: time inside "
             "SMDCallback's hooks per step measuring every step in `Trainer.fit` (ms, median); `step ms`: the whole "
             "step with the callback, for scale. ×T=10: ratio to T = 10 in the same column.", "",
             "| optimizer | tensors T | d | tracked params | measurement ms | × T=10 | callback self ms | × T=10 | step ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for opt in sorted({r["optimizer"] for r in rows}):
        mine = [r for r in rows if r["optimizer"] == opt]
        base = mine[0]
        for r in mine:
            lines.append(f"| {opt} | {r['count']} | {r['width']} | {r['params']:,} | {r['measure_ms']:.2f} | "
                         f"{r['measure_ms'] / base['measure_ms']:.2f} | "
                         f"{r.get('self_ms', math.nan):.2f} | {r.get('self_ms', math.nan) / base.get('self_ms', math.nan):.2f} | "
                         f"{r.get('step_ms', math.nan):.1f} |")
    lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for opt in sorted({r["optimizer"] for r in rows}):
        mine = [r for r in rows if r["optimizer"] == opt]
        xs = [r["count"] for r in mine]
        ax.plot(xs, [r["measure_ms"] for r in mine], "o-", label=f"{opt}: measurement")
        if all("self_ms" in r for r in mine):
            ax.plot(xs, [r["self_ms"] for r in mine], "s--", label=f"{opt}: callback self time")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"tracked tensors (total {TOTAL / 1e6:.2f} M parameters)")
    ax.set_ylabel("ms per measured step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=[10, 100, 1000, 3000])
    p.add_argument("--optimizers", nargs="+", default=["sgdm", "adamw"], choices=sorted(OPTIMIZERS))
    p.add_argument("--reps", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps of the Trainer.fit (0: skip the fit)")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps of the fit (detection included)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: the process's CPU time (robust to other jobs on a shared machine; use with --threads 1)")
    p.add_argument("--out", default=str(HERE / "results_tensor_count.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.clock == "cpu":
        CLOCK["fn"] = time.process_time
    warnings.filterwarnings("ignore")
    import logging

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    pin_malloc()
    info = machine_info("cpu")
    rows = []
    for opt in args.optimizers:
        for count in args.counts:
            width = max(2, round(math.sqrt(TOTAL / count)))
            row = {"optimizer": opt, "count": count, "width": width, "params": count * width * width,
                   "measure_ms": measurement_ms(count, opt, args.reps)}
            if args.steps:
                row["self_ms"], row["step_ms"] = callback_self_ms(count, opt, args.steps, args.warmup)
            rows.append(row)
            print(row, flush=True)
    try:
        info["load_average_end"] = os.getloadavg()
    except OSError:
        pass
    text = render(info, rows, argv)
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1, default=str))
        figure = out.with_name(out.stem.replace("results_", "") + ".png")  # results_tensor_count.md → tensor_count.png
        plot(rows, figure)
        print(f"wrote {out}, {out.with_suffix('.json')} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
