"""How many intra-op threads torch should use: what the machine gives this process.

torch sizes its pool from the machine's cores, not from the CPUs this process may run on
(containers, ``taskset``, CI runners). On a small shared machine that oversubscribes the cores
and a seconds-long fit takes minutes. Used by ``examples/train.py``, ``tests/conftest.py`` and
``docs/make_readme_figure.py``.
"""

from __future__ import annotations

import os

__all__ = ["available_cpus", "default_threads", "pin_torch_threads"]

#: Most threads used when the ``CI`` environment variable is set (CI runners share their cores).
CI_MAX_THREADS = 2


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_cpus() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` where missing),
    less those the last minute's load keeps busy (``os.getloadavg``), at least 1.

    OpenMP threads spin at every barrier: two threads on two cores that other processes use
    turned an 11 s test into 470 s (measured on a 2-core machine at load 6).
    """
    cpus = _affinity()
    try:
        idle = int(cpus - os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        idle = cpus
    return max(1, min(cpus, idle))


def default_threads() -> int | None:
    """``None`` when the user chose (``OMP_NUM_THREADS`` is set: torch already follows it), else
    :func:`available_cpus`, at most :data:`CI_MAX_THREADS` when ``CI`` is set."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    if os.environ.get("CI"):
        # the same count on every CI run (results of float reductions depend on it), load or not
        return min(_affinity(), CI_MAX_THREADS)
    return available_cpus()


def pin_torch_threads(threads: int | None = None) -> int:
    """``torch.set_num_threads(threads or default_threads())`` (unchanged when both are None);
    returns the thread count in effect."""
    import torch

    threads = threads or default_threads()
    if threads and threads != torch.get_num_threads():
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()
