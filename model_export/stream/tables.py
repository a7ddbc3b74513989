"""The fine ranker's sequence input for logged rows, as the serving version computed it.

The sample log keeps a row's `recent` ids, not the [L, d] sequence: the sequence is
`item_emb[recent]` of the bundle version that served the row (engine.core.featurize.
sequence_input), so it is rebuilt from that version's table. Versions whose item table is
the same file (hard-linked: the trainer did not change it) share one mapping. A row whose
version is gone from disk (pruned) gets the trainer's current table, and is counted.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from engine.core.featurize import Tables, sequence_input

ITEM_EMB = "tables/item_emb.npy"


class SeqSource:
    """`(recent [B, L], versions [B]) -> (seq [B, L, d], mask [B, L])`."""

    def __init__(self, root: Path, current: Tables):
        self.root, self.current = root, current
        self._by_version: dict[str, Tables] = {}
        self._by_inode: dict[tuple[int, int], Tables] = {}
        self.from_current = 0           # rows whose serving version was no longer on disk
        self.only: Tables | None = None

    @classmethod
    def fixed(cls, tables: Tables) -> "SeqSource":
        """Every row through one table (a candidate's, not yet on disk)."""
        src = cls(Path(), tables)
        src.only = tables
        return src

    def set_current(self, tables: Tables) -> None:
        self.current = tables

    def tables(self, version: str) -> Tables | None:
        if self.only is not None:
            return self.only
        t = self._by_version.get(version)
        if t is None:
            path = self.root / version / ITEM_EMB
            try:
                st = os.stat(path)
            except OSError:
                return None
            key = (st.st_dev, st.st_ino)
            t = self._by_inode.get(key)
            if t is None:
                t = dataclasses.replace(self.current, item_emb=np.load(path, mmap_mode="r", allow_pickle=False))
                self._by_inode[key] = t
            self._by_version[version] = t
        return t

    def __call__(self, recent: np.ndarray, versions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        names = np.unique(versions)
        if names.size == 1:
            t = self.tables(str(names[0]))
            if t is None:
                self.from_current += len(recent)
            return sequence_input(t or self.current, recent)
        seq = np.empty((*recent.shape, self.current.item_emb.shape[1]), np.float32)
        mask = np.empty(recent.shape, np.float32)
        for v in names:
            rows = versions == v
            t = self.tables(str(v))
            if t is None:
                self.from_current += int(rows.sum())
            seq[rows], mask[rows] = sequence_input(t or self.current, recent[rows])
        return seq, mask

    def forget(self, keep: set[str]) -> None:
        """Drop the mappings of versions not in `keep` (pruned from disk)."""
        self._by_version = {v: t for v, t in self._by_version.items() if v in keep}
        live = {id(t) for t in self._by_version.values()}
        self._by_inode = {k: t for k, t in self._by_inode.items() if id(t) in live}

