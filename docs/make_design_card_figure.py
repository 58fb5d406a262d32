"""Run the design card's command as written and report what it shows (the README's numbers and figures).

    python docs/make_design_card_figure.py [--run-dir DIR] [--docs docs]

Runs ``python examples/train.py model=resnet50 smd.rescale=true`` (no other override: the default
data, sklearn's digits, with the digits+resnet50 pairing of ``conf/pairing/``) in a subprocess,
timing it (wall clock and the CPU time of the process and its children), then reads the run's
``metrics.csv`` and prints: the final val/acc, the LR drop and rescale steps, the first stage's
equilibrium as the plan predicted it (``smd/plan.csv``) and as measured, and the mean Δ_t/Δ* over
the scale-invariant tensors before the drop and at the first logged points after it. Copies
``smd_angular_update.png`` and ``smd_channel_bands.png`` into ``--docs`` as
``design_card_angular_update.png`` and ``resnet50_channel_bands.png``.

``--run-dir`` reads an existing run of the same command instead of training (no timing then).
``--check`` exits 1 unless the run keeps the design card's promise (issue 26): under 4 minutes of wall
clock (when it ran the command), val/acc ≥ 0.9 at the end, an LR drop, after the plan's first-stage
equilibrium step, a rescale at it, and the mean Δ_t/Δ* of the tensors within 1 ± 0.3 (the band of
the callback's far-from-equilibrium warning) both over the second half of the first stage, where the
plan says it is at equilibrium, and over the 10 steps after the drop.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_smd import report  # noqa: E402
from lightning_smd.report.series import RunSeries  # noqa: E402

COMMAND = ["examples/train.py", "model=resnet50", "smd.rescale=true"]


def run_command(run_dir: Path) -> tuple[float, float]:
    """Run the command into ``run_dir``; ``(wall seconds, CPU seconds of the children)``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *COMMAND, f"hydra.run.dir={run_dir}"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (run_dir / "console.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"the command failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def last_value(path: Path, key: str) -> float | None:
    value = None
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get(key):
                value = float(row[key])
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=None, help="read this finished run instead of training")
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the run keeps the card's promise")
    args = parser.parse_args(argv)
    timing = None
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = REPO / "outputs" / "design_card" / time.strftime("%Y-%m-%d_%H-%M-%S")
        timing = run_command(run_dir)
    metrics = next(run_dir.rglob("metrics.csv"))
    series = RunSeries.from_csv(metrics)
    changes = report.lr_changes(series)
    with warnings.catch_warnings():  # steps where no tensor has a Δ* (before detection) are NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        ratio = np.nanmean(series.ratio, axis=1)
    print(f"command: python {' '.join(COMMAND)}  (run dir {run_dir})")
    if timing:
        print(f"time: {timing[0]:.0f} s wall, {timing[1]:.0f} s CPU (process + children), "
              f"{os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"final val/acc: {last_value(metrics, 'val/acc'):.3f}; optimizer steps: {int(series.steps[-1]) + 1}")
    print(f"LR changes at steps: {changes}; rescales: {[(s, round(f, 4)) for s, f in series.rescale_events]}")
    plan = run_dir / "smd" / "plan.csv"
    settled = None
    if plan.is_file():
        with plan.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if not row["steps_to_equilibrium"].strip().isdigit():
                    continue  # a group without scale-invariant tensors (BN γ/β, biases: no weight decay)
                print(f"plan: group {row['group']} stage {row['stage']} steps {row['start_step']}–{row['end_step']}, "
                      f"needs {row['steps_to_equilibrium']} steps to its equilibrium")
                if row["stage"] == "0":
                    settled = int(row["start_step"]) + int(row["steps_to_equilibrium"])
    failures = []
    if changes:
        drop = changes[0]
        before = (series.steps >= drop // 2) & (series.steps < drop)
        after = (series.steps >= drop) & (series.steps < drop + 10)
        right_after = float(np.nanmean(ratio[after]))
        settled_ratio = float(np.nanmean(ratio[before]))
        print(f"mean Δ_t/Δ* over the tensors: steps {drop // 2}–{drop - 1} (second half of stage 0): "
              f"{settled_ratio:.3f}; steps {drop}–{drop + 9} (right after the drop): {right_after:.3f}")
        if not 0.7 <= settled_ratio <= 1.3:
            failures.append(f"Δ_t is not on Δ* before the drop, where the plan says stage 0 is at equilibrium "
                            f"(mean Δ_t/Δ* {settled_ratio:.3f}, not 1 ± 0.3)")
        if not 0.7 <= right_after <= 1.3:
            failures.append(f"Δ_t is not on the new Δ* right after the drop (mean Δ_t/Δ* {right_after:.3f}, not 1 ± 0.3)")
    if timing and timing[0] >= 240:
        failures.append(f"the run took {timing[0]:.0f} s, not under 4 minutes")
    accuracy = last_value(metrics, "val/acc")
    if accuracy is None or accuracy < 0.9:
        failures.append(f"final val/acc {accuracy} < 0.9")
    if not changes:
        failures.append("no LR drop")
    elif settled is not None and changes[0] < settled:
        failures.append(f"the LR drop at step {changes[0]} comes before the plan's equilibrium (step {settled})")
    if changes and changes[0] not in [s for s, _ in series.rescale_events]:
        failures.append(f"no rescale at the LR drop (step {changes[0]})")
    print("card's promise: " + ("kept" if not failures else "NOT kept: " + "; ".join(failures)))
    args.docs.mkdir(parents=True, exist_ok=True)
    for source, target in (("smd_angular_update.png", "design_card_angular_update.png"),
                           ("smd_channel_bands.png", "resnet50_channel_bands.png")):
        if (run_dir / "smd" / source).is_file():
            shutil.copyfile(run_dir / "smd" / source, args.docs / target)
            print(f"copied {run_dir / 'smd' / source} -> {args.docs / target}")
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
