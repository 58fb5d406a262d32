"""Cost of one measured step's tensor work alone (no Trainer): ``StepMeasurer`` per mode, and the
reduction primitives it is built from, on a torchvision model's tracked tensors.

    python benchmarks/measure_step.py                      # resnet18, CPU
    python benchmarks/measure_step.py --model resnet50 --device cuda

What it shows: a measured step is bound by memory bandwidth, so its cost is the number of full
reads of the tracked tensors times one read's time. The primitives table gives one read's time for
each way of taking a sum (``_foreach_norm``, a ``dot`` per tensor, ``vector_norm``); the measurer
table gives ``before_step`` and ``after_step`` for each mode, with and without the unit-gradient
statistics. Times are medians over ``--reps`` after 3 warm-up repetitions; an optimizer step runs
between ``before_step`` and ``after_step`` (not timed), as in training.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lightning_smd.core.measure import GroupSlice, StepMeasurer, measurement_mode  # noqa: E402

OPTIMIZERS = {
    "sgdm": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str, reps: int, between=None) -> float:
    """Median wall time of ``fn()`` in ms; ``between()`` runs untimed before each call."""
    times = []
    for i in range(reps + 3):
        if between is not None:
            between()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    import torchvision

    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(num_classes=10).to(args.device)
    tracked = [q for q in model.parameters() if q.dim() == 4]  # the convolutions: each feeds a BatchNorm
    mib = sum(q.numel() for q in tracked) * 4 / 2**20
    print(f"# {args.model}: {len(tracked)} conv tensors, {mib:.1f} MiB; {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")

    weights = [q.detach() for q in tracked]
    others = [torch.randn_like(w) for w in weights]
    buffers = [torch.empty_like(w) for w in weights]
    print("| one read of the tracked tensors, as | ms | GB/s |\n|---|---|---|")
    primitives = {
        "torch._foreach_norm (all tensors)": lambda: torch._foreach_norm(weights, 2),
        "torch.linalg.vector_norm per tensor": lambda: [torch.linalg.vector_norm(w) for w in weights],
        "torch.dot(w, w) per tensor": lambda: [torch.dot(w.view(-1), w.view(-1)) for w in weights],
        "torch.dot(w, v) per tensor (two reads)": lambda: [torch.dot(w.view(-1), v.view(-1)) for w, v in zip(weights, others)],
        # per-unit (output channel) sums, the options for the same read
        "linalg.vecdot(w, w) rows per tensor": lambda: [torch.linalg.vecdot(w.view(len(w), -1), w.view(len(w), -1))
                                                        for w in weights],
        "bmm row dots (w, v) per tensor (two reads)": lambda: [torch.bmm(w.view(len(w), 1, -1), v.view(len(v), -1, 1))
                                                                for w, v in zip(weights, others)],
        "mul into buffer + row sum (w, v) (two reads)": lambda: [torch.mul(w, v, out=b).view(len(w), -1).sum(1)
                                                                  for w, v, b in zip(weights, others, buffers)],
        "linalg.vecdot(w, v) rows per tensor (two reads)": lambda: [torch.linalg.vecdot(w.view(len(w), -1), v.view(len(v), -1))
                                                                     for w, v in zip(weights, others)],
    }
    for name, fn in primitives.items():
        ms = _time(fn, args.device, args.reps)
        reads = 2 if "two reads" in name else 1
        print(f"| {name} | {ms:.2f} | {reads * mib * 2**20 / 1e9 / (ms / 1e3):.0f} |")

    print("\n| optimizer | mode | unit gradient | per unit | before_step ms | after_step ms | total ms |\n"
          "|---|---|---|---|---|---|---|")
    for opt_name, make in OPTIMIZERS.items():
        for q in model.parameters():
            q.grad = 1e-3 * torch.randn_like(q)
        opt = make(model.parameters())
        opt.step()
        mode = measurement_mode(opt, opt.param_groups[0])
        for per_unit, unit_grad in ((False, False), (True, False), (False, True), (True, True)):
            units = [len(q) for q in tracked] if per_unit else None  # one unit per output channel (BatchNorm)
            measurer = StepMeasurer([GroupSlice(opt, 0, tracked, 0, mode, units=units)])
            before, after = [], []
            for i in range(args.reps + 3):
                _sync(args.device)
                t0 = time.perf_counter()
                measurer.before_step(unit_grad=unit_grad)
                _sync(args.device)
                t1 = time.perf_counter()
                opt.step()
                _sync(args.device)
                t2 = time.perf_counter()
                measurer.after_step()[0].tolist()
                t3 = time.perf_counter()
                if i >= 3:
                    before.append(t1 - t0)
                    after.append(t3 - t2)
            b, a = 1e3 * statistics.median(before), 1e3 * statistics.median(after)
            print(f"| {opt_name} | {mode} | {'sampled' if unit_grad else 'skipped'} | {'channels' if per_unit else 'no'} | "
                  f"{b:.2f} | {a:.2f} | {b + a:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
