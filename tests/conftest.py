"""Test-wide settings: headless plotting, offline W&B, CPU-sized thread pools, GPU marker."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402


def _pin_threads() -> None:
    """torch's intra-op threads = the CPUs this process may use (``os.sched_getaffinity``, less
    those the load average keeps busy), at most 2 under CI, unless ``OMP_NUM_THREADS`` is set.
    torch sizes its pool from the machine's cores: on a busy 2-core machine two spinning OpenMP
    threads made an 11 s test take 470 s. Subprocesses get the same count (``OMP_NUM_THREADS``);
    the logic is examples/threads.py's, repeated so that conftest imports nothing of the repo."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    # CI: always the same count (float results depend on it); elsewhere less the busy CPUs
    threads = min(cpus, 2) if os.environ.get("CI") else max(1, min(cpus, int(cpus - os.getloadavg()[0] + 0.5)))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


_pin_threads()


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Offline, silent W&B; the environment (WandbLogger sets WANDB_MODE itself) is restored."""
    wandb = pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_DIR": str(tmp_path), "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(key, value)
    yield
    if wandb.run is not None:
        wandb.finish()
