"""Names → rows of arrays kept over all tensors (the running estimates, the equilibrium windows)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["NameRows"]


class NameRows:
    """Each name's row, new names appended; the rows of the last list of names cached (a measured
    step passes the same list every time).

    ``names[i]`` is the name of row ``i``; :meth:`rows` returns the rows and how many were added, so
    the owner grows its arrays by that many."""

    def __init__(self) -> None:
        self.row: dict[str, int] = {}
        self.names: list[str] = []
        self._last: tuple[tuple[str, ...], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, names: Sequence[str]) -> tuple[np.ndarray, int]:
        """``(rows of names, rows added)``."""
        key = tuple(names)
        if self._last is not None and self._last[0] == key:
            return self._last[1], 0
        new = [n for n in dict.fromkeys(key) if n not in self.row]
        for name in new:
            self.row[name] = len(self.names)
            self.names.append(name)
        index = np.fromiter((self.row[n] for n in key), dtype=np.int64, count=len(key))
        self._last = (key, index)
        return index, len(new)
