"""The benchmark scripts run end to end (tiny settings) and report what the README quotes."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench_path(monkeypatch):
    import torch

    threads = torch.get_num_threads()  # the scripts set it for the process
    monkeypatch.syspath_prepend(str(BENCH))
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_overhead_benchmark_runs_and_reports(tmp_path, bench_path, capsys):
    import overhead

    out = tmp_path / "results.md"
    code = overhead.main(["--models", "resnet18:32:16", "--optimizers", "sgdm", "adamw", "--rounds", "1",
                          "--steps", "3", "--warmup", "6", "--threads", "1", "--malloc", "default",
                          "--out", str(out)])
    assert code == 0
    text = out.read_text()
    assert "| resnet18 32×32 b16 | sgdm | buffer |" in text and "| resnet18 32×32 b16 | adamw | snapshot |" in text
    assert "allocator: default" in text and "page faults" in text
    data = json.loads(out.with_suffix(".json").read_text())
    by_opt = {r["optimizer"]: r["variants"] for r in data["results"]}
    for variants in by_opt.values():
        for name in ("smd_default", "smd_every", "naive_every"):
            assert variants[name]["step_ms_median"] > 0 and variants[name]["self_ms_median"] > 0
    # no copy of the weights with momentum; one copy of the tracked tensors for AdamW
    # (the rest: cached coefficients, masks and the per-unit segment indices, ~8 B per invariance unit)
    assert by_opt["sgdm"]["smd_every"]["persistent_bytes"] < 64 * 1024
    adamw = by_opt["adamw"]["smd_every"]
    assert 0 <= adamw["persistent_bytes"] - adamw["tracked_bytes"] < 64 * 1024


@pytest.mark.slow
def test_measure_step_benchmark_runs(bench_path, capsys):
    import measure_step

    assert measure_step.main(["--reps", "1", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    for row in ("| sgdm | buffer | skipped |", "| sgd | grad | sampled |", "| adamw | snapshot | sampled |"):
        assert row in printed
    assert sys.modules["measure_step"].OPTIMIZERS
