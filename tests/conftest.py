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
    the logic is examples/threads.py's, repeated so that conftest imports nothing of the repo.
    Under pytest-xdist (``-n N``) each worker gets its share: the count divided by N."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)  # pytest -n N: the CPUs are shared
    if os.environ.get("OMP_NUM_THREADS") and not (workers > 1 and os.environ.get("SMD_TESTS_PINNED")):
        return  # set by the user (not by this function in the pytest -n process that started the worker)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    # CI: always the same count (float results depend on it); elsewhere less the busy CPUs
    threads = min(cpus, 2) if os.environ.get("CI") else max(1, min(cpus, int(cpus - os.getloadavg()[0] + 0.5)))
    threads = max(1, threads // workers)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["SMD_TESTS_PINNED"] = "1"


_pin_threads()


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    _xdist_groups(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Files whose tests start several processes (DDP/FSDP2/TP on gloo, torchrun-style workers): under
# pytest-xdist they share one group, so that no two of them compete for the cores at once.
MULTIPROCESS_FILES = {"test_sharded_layouts.py", "test_training_setups.py", "test_strategies.py",
                      "test_examples_strategies.py", "test_qknorm.py", "test_fault.py", "test_namespaces.py"}


# The longest groups of the slow tier (minutes each on 2 cores): under pytest-xdist they start
# first, so that no worker is left with one of them at the end while the other idles.
LONGEST_FIRST = ("multiprocess", "test_zoo.py", "test_zoo_fit.py", "test_rescale.py")


def _xdist_groups(items) -> None:
    """``pytest -n N --dist loadgroup``: each file runs on one worker (its module-scoped fixtures
    are built once), the multi-process files all on the same one; the longest groups first."""
    groups = {}
    for item in items:
        name = item.path.name
        groups[item] = "multiprocess" if name in MULTIPROCESS_FILES else name
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(groups[item], len(rank)))  # stable: file order otherwise


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
