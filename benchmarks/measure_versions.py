"""Tensor work of one measured step, this checkout against an earlier revision of ``lightning_smd/core/measure.py``.

    python benchmarks/measure_versions.py --rev 0831045 --threads 1 --clock cpu
    python benchmarks/measure_versions.py --rev 0831045 --model resnet50

resnet's convolutions (each feeds a BatchNorm: one unit per output channel), SGD-M and AdamW, with
and without per-channel statistics. Each repetition runs every (revision, per-unit) measurer around
its own real optimizer step, interleaved, so both versions see the same machine state; the unit
gradient is not sampled (as on 7 measured steps in 8 by default). ``--clock cpu`` times the
process's CPU time, which other jobs on a shared machine do not inflate by descheduling (use it
with ``--threads 1``). Glibc's malloc thresholds are pinned as in ``overhead.py``. Prints a
Markdown table: median and minimum ms per measured step (``before_step`` + ``after_step`` + the
host copy).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from overhead import pin_malloc  # noqa: E402

OPTIMIZERS = {
    "sgdm": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
}


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", default="0831045", help="the earlier revision (git) of lightning_smd/measure.py")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    args = p.parse_args(argv)
    import torchvision

    pin_malloc()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    old_source = None
    for where in ("lightning_smd/core/measure.py", "lightning_smd/measure.py"):  # the module moved into core/
        shown = subprocess.run(["git", "show", f"{args.rev}:{where}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode == 0:
            old_source = shown.stdout
            break
    if old_source is None:
        raise SystemExit(f"no lightning_smd/core/measure.py or lightning_smd/measure.py at revision {args.rev}")
    with tempfile.TemporaryDirectory() as tmp:
        old_path = Path(tmp) / "measure_old.py"
        old_path.write_text(old_source)
        versions = {args.rev: load(old_path, "measure_old"), "this checkout": load(ROOT / "lightning_smd" / "core" / "measure.py", "measure_new")}
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(num_classes=10)
    tracked = [q for q in model.parameters() if q.dim() == 4]
    print(f"# {args.model}: {len(tracked)} conv tensors; {args.threads} thread(s); clock {args.clock}; torch {torch.__version__}\n")
    print("| optimizer | version | mode | statistics | median ms | min ms |\n|---|---|---|---|---|---|")
    for opt_name, make in OPTIMIZERS.items():
        for q in model.parameters():
            q.grad = 1e-3 * torch.randn_like(q)
        opt = make(model.parameters())
        opt.step()
        measurers = {}
        for label, module in versions.items():
            mode = module.measurement_mode(opt, opt.param_groups[0])
            for per_unit in (False, True):
                units = [len(q) for q in tracked] if per_unit else None
                measurers[label, mode, per_unit] = module.StepMeasurer([module.GroupSlice(opt, 0, tracked, 0, mode, units=units)])
        times = {key: [] for key in measurers}
        for i in range(args.reps + 2):
            for key, measurer in measurers.items():
                t0 = clock()
                measurer.before_step(unit_grad=False, per_unit=key[2])
                t1 = clock()
                opt.step()
                t2 = clock()
                measurer.after_step()[0].tolist()
                t3 = clock()
                if i >= 2:
                    times[key].append(1e3 * (t1 - t0 + t3 - t2))
        for (label, mode, per_unit), ts in times.items():
            print(f"| {opt_name} | {label} | {mode} | {'per channel' if per_unit else 'per tensor'} | "
                  f"{statistics.median(ts):.2f} | {min(ts):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
