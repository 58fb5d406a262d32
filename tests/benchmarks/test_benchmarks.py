"""The benchmark scripts run end to end (tiny settings) and report what the README quotes."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


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
    assert "| resnet18 32×32 b16 | sgdm | buffer |" in text and "| resnet18 32×32 b16 | adamw | adam |" in text
    assert "cvpods-style" in text and "REQ-style" in text and "cheaper than the cheapest peer" in text
    assert "allocator: default" in text and "page faults" in text
    data = json.loads(out.with_suffix(".json").read_text())
    by_opt = {r["optimizer"]: r["variants"] for r in data["results"]}
    for variants in by_opt.values():
        for name in ("smd_default", "smd_every", "naive_every", "cvpods_every", "req_every"):
            assert variants[name]["step_ms_median"] > 0 and variants[name]["self_ms_median"] > 0
    # no copy of the weights held between steps, SGD-M and AdamW alike: under 1 % of the tracked tensors
    # (cached coefficients, masks and the row → column indices, ~16 B per output channel)
    for opt in ("sgdm", "adamw"):
        smd = by_opt[opt]["smd_every"]
        assert smd["persistent_bytes"] < 0.01 * smd["tracked_bytes"], (opt, smd["persistent_bytes"])
    assert by_opt["adamw"]["cvpods_every"]["persistent_bytes"] >= by_opt["adamw"]["cvpods_every"]["tracked_bytes"]


@pytest.mark.slow
def test_measure_step_benchmark_runs(bench_path, capsys):
    import measure_step

    assert measure_step.main(["--reps", "1", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    for row in ("| sgdm | buffer | skipped |", "| sgd | grad | sampled |", "| adamw | adam | sampled |"):
        assert row in printed
    assert sys.modules["measure_step"].OPTIMIZERS


@pytest.mark.slow
def test_tensor_count_benchmark_runs(tmp_path, bench_path, capsys):
    import tensor_count

    out = tmp_path / "tc.md"
    assert tensor_count.main(["--counts", "10", "40", "--optimizers", "adamw", "--reps", "1", "--steps", "2",
                              "--warmup", "4", "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["count"] for r in rows] == [10, 40] and all(r["measure_ms"] > 0 and r["self_ms"] > 0 for r in rows)
    assert (tmp_path / "tc.png").stat().st_size > 1000  # named after --out
