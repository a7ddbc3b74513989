"""Candidates: the struct of arrays every stage takes and returns.

A batch is columns, never a list of objects, so every stage works with numpy
gathers and argpartition and never loops per candidate in Python.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

TASK_PREFIX = "task:"      # the fine ranker's per-task score columns: task:click, task:like, ...


def task_column(task: str) -> str:
    """The score column of one model task."""
    return TASK_PREFIX + task


class Guarantee(IntEnum):
    """How far a pinned item is protected from truncation.

    A truncating stage at level L keeps every candidate whose guarantee is >= L.
    """

    NONE = 0
    COARSE = 1  # survives both coarse-ranking cuts, so it is fine-ranked
    FINE = 2    # also survives a fine-ranking cut
    FINAL = 3   # forced into the served list


@dataclass(slots=True)
class Candidates:
    item: np.ndarray                         # int32 catalog index
    routes: np.ndarray                       # uint8 bitmask of recall routes that found the item
    guaranteed: np.ndarray                   # int8 Guarantee
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # named float32 [n] columns
    feats: dict[str, np.ndarray] = field(default_factory=dict)   # [n, k] features stages share
    primary: str = "recall"                  # the score column of the latest ranking stage

    @classmethod
    def empty(cls) -> "Candidates":
        return cls(np.empty(0, np.int32), np.empty(0, np.uint8), np.empty(0, np.int8), {})

    @classmethod
    def from_route(cls, item: np.ndarray, score: np.ndarray, route_bit: int,
                   guarantee: np.ndarray | int = Guarantee.NONE) -> "Candidates":
        item = np.asarray(item, np.int32)
        g = np.broadcast_to(np.asarray(guarantee, np.int8), item.shape).copy()
        return cls(item, np.full(item.shape, route_bit, np.uint8), g,
                   {"recall": np.asarray(score, np.float32)})

    def __len__(self) -> int:
        return int(self.item.shape[0])

    def take(self, idx: np.ndarray) -> "Candidates":
        """Rows at `idx` (int indices or bool mask), every column alike."""
        if idx.dtype == np.bool_:
            idx = np.flatnonzero(idx)
        return Candidates(self.item[idx], self.routes[idx], self.guaranteed[idx],
                          {k: v[idx] for k, v in self.scores.items()},
                          {k: rows(v, idx) for k, v in self.feats.items()}, self.primary)

    def with_columns(self, scores: dict[str, np.ndarray] | None = None,
                     feats: dict[str, np.ndarray] | None = None, primary: str | None = None) -> "Candidates":
        """A new batch sharing the row arrays, with extra score/feature columns."""
        return Candidates(self.item, self.routes, self.guaranteed,
                          {**self.scores, **{k: np.asarray(v, np.float32) for k, v in (scores or {}).items()}},
                          {**self.feats, **(feats or {})}, primary or self.primary)

    def task_scores(self) -> dict[str, np.ndarray]:
        """Task name -> its score column, for the task columns present (none if fine ranking was skipped)."""
        n = len(TASK_PREFIX)
        return {k[n:]: v for k, v in self.scores.items() if k.startswith(TASK_PREFIX)}

    def keep_top(self, score: np.ndarray, keep: int, level: Guarantee) -> "Candidates":
        """The `keep` best by `score`, best first; every candidate guaranteed to `level` is among them.
        Equal scores come in an arbitrary but repeatable order (numpy's SIMD sort, ~5x faster than
        its stable one on these sizes).

        Pinned items take slots rather than adding to `keep`, so the next stage's batch stays
        bounded (unless more items are pinned than `keep`: then all of them survive).
        """
        n = len(self)
        if n <= keep:
            return self.take(np.argsort(-score))
        protected = self.guaranteed >= level
        n_protected = int(np.count_nonzero(protected))
        if n_protected > keep:
            idx = np.flatnonzero(protected)
        else:           # the protected rank first at +inf, so the top `keep` already holds them all
            boosted = np.where(protected, np.inf, score) if n_protected else score
            idx = np.argpartition(-boosted, keep - 1)[:keep]
        return self.take(idx[np.argsort(-score[idx])])


def rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """`a[idx]` along the first axis. For 2-D arrays np.take copies each row as one block and
    is ~4x faster than fancy indexing, which walks the row element by element (0.04 vs 0.18 ms
    for 2509 rows of 32 floats; BENCHMARKS.md)."""
    return np.take(a, idx, axis=0)


def found_in(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bool [len(a)]: which of `a` are in `b`, for a short `b` (a user's seen items against a
    batch): one sort of `b` and a binary search per element of `a`, where np.isin sorts both
    (0.06 against 0.19-0.25 ms for 2,500 against 250; BENCHMARKS.md)."""
    if b.size == 0:
        return np.zeros(a.shape, bool)
    s = np.sort(b)
    return s[np.minimum(np.searchsorted(s, a), s.size - 1)] == a


def ranges(start: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The indices start[j] .. start[j] + n[j] - 1 for every j, concatenated: the rows of
    several CSR rows or list segments, without a Python loop over them."""
    return np.repeat(start - np.cumsum(n) + n, n) + np.arange(int(n.sum()))


def merge(parts: list[Candidates]) -> Candidates:
    """Union of route outputs: one row per item, OR of route bits, max guarantee, best recall score.

    One sort of the item ids and a segmented reduction per column: ~25% cheaper than np.unique's
    inverse plus a scatter (ufunc.at) per column (BENCHMARKS.md). The reductions do not care
    how an item's rows are ordered in its run, so the sort need not be stable: numpy's SIMD
    argsort is ~5x faster than the stable one on ~3000 ids."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Candidates.empty()
    item = np.concatenate([p.item for p in parts])
    order = np.argsort(item)
    ids = item[order]
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))

    def reduce(ufunc: np.ufunc, column: list[np.ndarray]) -> np.ndarray:
        return ufunc.reduceat(np.concatenate(column)[order], starts)

    return Candidates(ids[starts], reduce(np.bitwise_or, [p.routes for p in parts]),
                      reduce(np.maximum, [p.guaranteed for p in parts]),
                      {"recall": reduce(np.maximum, [p.scores["recall"] for p in parts])})


def top_k(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest scores, in no order; exact, ties broken arbitrarily.

    On a long array (a route scoring a whole pool) a full argpartition moves every element;
    instead, a threshold taken from a strided sample keeps ~2k survivors, and only those are
    partitioned: 14x cheaper for k = 240 of 73k (BENCHMARKS.md). Every true top-k score is >=
    the threshold whenever at least k survive, so the answer is the same; else it falls back.
    """
    n = score.shape[0]
    if k <= 0:
        return np.empty(0, np.intp)
    if k >= n:
        return np.arange(n)
    if n >= 64 * k:
        stride = n // (16 * k)
        sample = score[::stride]
        r = min(sample.size, 2 * k // stride + 16)     # expect ~2k survivors, never too few by chance
        cand = np.flatnonzero(score >= np.partition(sample, sample.size - r)[sample.size - r])
        if cand.size >= k:
            return cand[np.argpartition(score[cand], cand.size - k)[cand.size - k:]]
    return np.argpartition(score, n - k)[n - k:]

