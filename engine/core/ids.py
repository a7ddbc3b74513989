"""External ids -> rows of a bundle's id array, without a Python dict in every worker.

A dict over a 1M-item catalog holds a str and an int object per id: ~130 MB of private memory
in every worker process (the bundle's own id array is mmap'd and shared). This keeps the ids'
sort order instead (4 bytes an id, plus the sorted copy) and finds ids by binary search, a
batch at a time: a request's excludes or an events batch is one searchsorted call.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class IdIndex:
    def __init__(self, ids: np.ndarray):
        ids = np.asarray(ids)
        if ids.dtype.kind != "U":
            raise ValueError(f"ids must be a unicode array, not {ids.dtype}")
        self._order = np.argsort(ids, kind="stable").astype(np.int32)
        self._sorted = ids[self._order]
        self._width = ids.dtype.itemsize // 4       # characters of the longest id

    def __len__(self) -> int:
        return len(self._order)

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """int32 rows of `keys`, -1 for an id the array does not hold."""
        if len(keys) == 0 or len(self._order) == 0:
            return np.full(len(keys), -1, np.int32)
        q = np.asarray(keys, dtype=str)
        fits = np.char.str_len(q) <= self._width     # a longer key cut to the ids' width must not match
        q = q.astype(self._sorted.dtype)             # one dtype: searchsorted would convert the ids per call
        at = np.minimum(np.searchsorted(self._sorted, q), len(self._order) - 1)
        return np.where(fits & (self._sorted[at] == q), self._order[at], -1).astype(np.int32)

    def known(self, keys: Sequence[str]) -> np.ndarray:
        """int32 rows of the keys the array holds; unknown ones left out (excludes, side files)."""
        rows = self.rows(keys)
        return rows[rows >= 0]

    def get(self, key: str, default: int = -1) -> int:
        row = int(self.rows([key])[0])
        return row if row >= 0 else default

    def __contains__(self, key: str) -> bool:
        return self.get(key) >= 0

    def __getitem__(self, key: str) -> int:
        row = self.get(key)
        if row < 0:
            raise KeyError(key)
        return row
