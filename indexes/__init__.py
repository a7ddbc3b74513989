"""ANN index over item embeddings behind one small interface; faiss is the first backend.

The engine depends on `AnnIndex` and the functions below, never on faiss itself, so another
backend only has to provide the same few members.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from indexes.faiss_index import (FaissIndex, build_index, exact_ids, load_index, measure_recall, recall,
                                 tune_nprobe)


class AnnIndex(Protocol):
    kind: str          # flat | ivf_flat | ivf_sq8
    threads: int       # threads per search call

    @property
    def ntotal(self) -> int: ...
    @property
    def d(self) -> int: ...
    @property
    def nlist(self) -> int: ...
    @property
    def nprobe(self) -> int: ...
    @nprobe.setter
    def nprobe(self, value: int) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """scores float32 [q, k], ids int32 [q, k]; ids -1 where fewer than k items."""
        ...

    def save(self, path: str | Path) -> None: ...


__all__ = ["AnnIndex", "FaissIndex", "build_index", "load_index", "measure_recall", "tune_nprobe",
           "exact_ids", "recall"]
