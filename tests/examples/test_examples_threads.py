"""Thread pinning of the examples, the figure script and the test suite (busy small machines)."""

from __future__ import annotations

import os

import torch

from examples import threads


def test_threads_follow_affinity_load_ci_and_omp(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert threads.default_threads() == 8
    monkeypatch.setattr(os, "getloadavg", lambda: (6.5, 0.0, 0.0))  # 6.5 of 8 CPUs busy
    assert threads.default_threads() == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (20.0, 0.0, 0.0))
    assert threads.default_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("CI", "true")
    assert threads.default_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() is None  # the user chose


def test_pin_torch_threads_and_conftest(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.pin_torch_threads(1) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads.pin_torch_threads(None) == 1  # OMP_NUM_THREADS set: left alone
    finally:
        torch.set_num_threads(before)
    # conftest pinned the suite and told subprocesses through OMP_NUM_THREADS
    assert os.environ.get("OMP_NUM_THREADS") is not None
