"""Time to render the figures SMDCallback writes at the end of fit, on resnet18/resnet50-shaped runs.

    python benchmarks/figures.py [--steps 400] [--out DIR]

Builds, for each torchvision model, the data a long run leaves on rank 0: every conv weight that
feeds a BatchNorm as a tracked tensor (its output channels as per-channel units), ``--steps`` logged
points with an LR drop ÷10 at 60 % of them, and a full per-unit record (``ChannelMetrics`` at its
256-column capacity), from synthetic Δ_t values around Δ* (a few stalled units, layers off by
different amounts). Then it times what the callback does at fit end: ``report.save_figures`` (the
four per-tensor figures) + ``channel_figures.save_channel_figures`` (bands, heatmap and its record),
best of ``--repeat``, and the first repetition alone (the cold render a fit's end pays once). Prints one line per model; the PNGs are left in ``--out`` to be looked at.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_smd import theory  # noqa: E402
from lightning_smd.report.channel_figures import save_channel_figures  # noqa: E402
from lightning_smd.core.channels import ChannelMetrics  # noqa: E402
from lightning_smd.report import save_figures  # noqa: E402
from lightning_smd.report.series import RunSeries  # noqa: E402


def conv_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Every conv weight of torchvision ``arch`` (each feeds a BatchNorm in these models)."""
    import torch
    import torchvision

    model = getattr(torchvision.models, arch)(num_classes=10)
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.ndim == 4 and n.endswith("weight")
            and isinstance(model.get_submodule(n.rsplit(".", 1)[0]), torch.nn.Conv2d)}


def synthetic_run(shapes: dict[str, tuple[int, ...]], steps: int, every: int = 50, seed: int = 0):
    """``(RunSeries, ChannelMetrics)`` of a run logging every ``every`` steps with an LR drop at 60 %."""
    rng = np.random.default_rng(seed)
    names, counts = list(shapes), [s[0] for s in shapes.values()]
    drop = int(0.6 * steps) * every
    offsets = rng.normal(0.0, 0.15, len(names))  # each layer's log-distance from Δ*
    channels = ChannelMetrics(window=200, ema_steps=200.0)
    records = []
    for i in range(steps):
        step = i * every + every - 1
        group = theory.GroupTheory("sgdm", 0.1 if step < drop else 0.01, 1e-4, momentum=0.9)
        star = group.angular_update
        ratio_layers = np.exp(offsets + 0.3 * np.exp(-(step - drop) / 2000.0) * (step >= drop))
        units = []
        for k, r in zip(counts, ratio_layers):
            delta = star * r * np.exp(rng.normal(0.0, 0.2, k))
            delta[: max(1, k // 50)] *= 0.02  # a few stalled filters
            units.append(np.stack([delta, np.full(k, 10.0), np.full(k, 1.0)]))
        metrics = channels.build(np.concatenate(units, axis=1), names, counts, [group] * len(names), step, step)
        for name, r in zip(names, ratio_layers):
            metrics[f"smd/angular_update/{name}"] = star * r
            metrics[f"smd/angular_update_theory/{name}"] = star
            metrics[f"smd/weight_norm/{name}"] = 10.0 * (1 + 0.1 * np.sin(i / 10))
            metrics[f"smd/weight_norm_theory/{name}"] = 10.0 if step < drop else 10.0 * 10 ** -0.25
            metrics[f"smd/unit_grad_sq/{name}"] = 1.0
        records.append((step, metrics))
    return RunSeries.from_records(records), channels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="logged points (default 400: 20 000 steps at 50)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    out_root = args.out or Path(tempfile.mkdtemp(prefix="smd_figures_"))
    for arch in args.models:
        shapes = conv_shapes(arch)
        series, channels = synthetic_run(shapes, args.steps)
        out = out_root / arch
        best = best_cpu = float("inf")
        first_cpu = None
        for _ in range(args.repeat):
            start, cpu = time.perf_counter(), time.process_time()
            written = save_figures(series, out)
            written.update(save_channel_figures(channels, out))
            best = min(best, time.perf_counter() - start)
            best_cpu = min(best_cpu, time.process_time() - cpu)
            first_cpu = time.process_time() - cpu if first_cpu is None else first_cpu
        units = sum(s[0] for s in shapes.values())
        print(f"{arch}: {len(shapes)} tensors, {units} units, {series.num_steps} logged points: "
              f"{len(written)} figures in {best:.2f} s wall, {best_cpu:.2f} s CPU (best of {args.repeat}; the first "
              f"render of the process, fonts and maths parsed then: {first_cpu:.2f} s CPU; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
