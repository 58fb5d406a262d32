"""What the callback logged, kept compactly on rank 0 for the figures and the summary table."""

from __future__ import annotations

from array import array
from typing import Iterator

__all__ = ["History"]


class History:
    """``(step, metrics)`` records as a list of ``(step, keys, values)``.

    Records logged with the same keys share one key tuple, and the values sit in an
    ``array('d')``: about 8 bytes per value instead of ~60 for a dict entry with its float, so a
    ResNet-50 run measured every 50 steps for 90 ImageNet epochs keeps ~20 MB instead of ~350 MB.
    Iterating yields ``(step, dict)`` pairs, the form ``RunSeries.from_records`` takes.
    """

    def __init__(self) -> None:
        self._rows: list[tuple[int, tuple[str, ...], array]] = []
        self._keysets: dict[tuple[str, ...], tuple[str, ...]] = {}

    def append(self, step: int, metrics: dict[str, float]) -> None:
        keys = tuple(metrics)
        keys = self._keysets.setdefault(keys, keys)
        self._rows.append((int(step), keys, array("d", metrics.values())))

    def __iter__(self) -> Iterator[tuple[int, dict[str, float]]]:
        for step, keys, values in self._rows:
            yield step, dict(zip(keys, values))

    def __len__(self) -> int:
        return len(self._rows)

    def __bool__(self) -> bool:
        return bool(self._rows)
