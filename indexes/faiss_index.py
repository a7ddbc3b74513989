"""Faiss behind the AnnIndex interface: exact flat, IVF-flat or IVF-SQ8 inner-product search.

Measured choices (indexes/bench.py, docs):
- libgomp's `omp_set_num_threads` only affects the *calling* thread, so `search` sets the
  thread count on every call; otherwise a recall-route worker thread would use every core, and
  one single-query search on 2 threads is slower than on 1.
- `load_index` maps the file (IO_FLAG_MMAP_IFC: zero-copy for flat codes and IVF lists alike),
  so several server processes share one copy of the pages. The file must be replaced, never
  rewritten in place; `save` writes a temp file and renames it.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import faiss
import numpy as np

_ADD_CHUNK = 100_000
_MIN_POINTS_PER_LIST = 39  # faiss k-means warns below this many training points per centroid
_KINDS = {faiss.IndexFlatIP: "flat", faiss.IndexIVFFlat: "ivf_flat",
          faiss.IndexIVFScalarQuantizer: "ivf_sq8"}


class FaissIndex:
    """One faiss index plus the per-call thread count the server wants for it."""

    def __init__(self, index: faiss.Index, threads: int = 1) -> None:
        if type(index) not in _KINDS:
            raise ValueError(f"unsupported faiss index type {type(index).__name__}")
        self.index = index
        self.kind: str = _KINDS[type(index)]
        self.threads = threads

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def d(self) -> int:
        return int(self.index.d)

    @property
    def nlist(self) -> int:
        """Inverted lists; a flat index is one list, always scanned whole."""
        return 1 if self.kind == "flat" else int(self.index.nlist)

    @property
    def nprobe(self) -> int:
        return 1 if self.kind == "flat" else int(self.index.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.kind != "flat":
            self.index.nprobe = max(1, min(int(value), self.nlist))

    def centroids(self) -> np.ndarray | None:
        """The IVF lists' centroids [nlist, d] (None for a flat index): a route can partition a
        pool of its own by the same lists (stages.recall_cold_start)."""
        if self.kind == "flat":
            return None
        q = faiss.downcast_index(self.index.quantizer)
        return np.ascontiguousarray(q.reconstruct_n(0, q.ntotal), dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: scores float32 [q, k], ids int32 [q, k], -1 where fewer than k."""
        faiss.omp_set_num_threads(self.threads)
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, ids.astype(np.int32)

    def save(self, path: str | Path) -> None:
        """Write atomically: processes that mapped the old file keep reading the old inode."""
        tmp = f"{path}.tmp{os.getpid()}"
        faiss.write_index(self.index, tmp)
        os.replace(tmp, path)


def build_index(emb: np.ndarray, kind: str = "flat", nlist: int = 1024, nprobe: int = 32,
                train_size: int = 100_000, progress: Callable[..., Iterable] | None = None,
                threads: int = 1) -> FaissIndex:
    """Index L2-normalised item embeddings [n, d] for inner-product search: `kind` is flat |
    ivf_flat | ivf_sq8; IVF kinds train `nlist` lists on `train_size` sampled rows.
    `progress(chunks, desc=..., unit=...)` wraps the add loop (model_export.progress.bar).

    One build thread by default: libgomp threads spin-wait, and on a busy 2-core machine two of
    them built 2-3x slower in wall time (and burned 2.7x the CPU) than one.
    """
    faiss.omp_set_num_threads(threads)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(d)
    else:
        nlist = max(1, min(nlist, n // _MIN_POINTS_PER_LIST))
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # items live on the unit sphere; keep the centroids there too
        sample = np.random.default_rng(0).choice(n, size=min(n, train_size), replace=False)
        index.train(emb[np.sort(sample)])
        index.nprobe = min(nprobe, nlist)
    chunks = range(0, n, _ADD_CHUNK)
    if progress is not None and len(chunks) > 1:
        chunks = progress(chunks, desc=f"faiss add {kind}", unit="chunk")
    for i in chunks:
        index.add(emb[i:i + _ADD_CHUNK])
    return FaissIndex(index)


def load_index(path: str | Path, nprobe: int | None = None, threads: int = 1) -> FaissIndex:
    """Memory-map a saved index, read-only; `nprobe` overrides the one stored in the file."""
    index = FaissIndex(faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC), threads)
    if nprobe is not None:
        index.nprobe = nprobe
    return index


def exact_ids(emb: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ground-truth top-k ids by brute-force inner product, [q, k] int64."""
    _, ids = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                       np.ascontiguousarray(emb, dtype=np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)
    return ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true neighbours that were found (-1 padding never matches)."""
    hits = sum(np.isin(t[t >= 0], f).sum() for f, t in zip(found, truth))
    return float(hits / max(1, int((truth >= 0).sum())))


def measure_recall(index: FaissIndex, emb: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Recall@k of `index` against exact search over the same embeddings."""
    return recall(index.search(queries, k)[1], exact_ids(emb, queries, k))


def tune_nprobe(index: FaissIndex, emb: np.ndarray, queries: np.ndarray, k: int,
                target: float = 0.95) -> int:
    """Set and return the smallest nprobe whose recall@k reaches `target` (nlist if none does).

    Recall only grows with nprobe, so doubling brackets the edge and bisection finds it.
    """
    truth = exact_ids(emb, queries, k)

    def reaches(p: int) -> bool:
        index.nprobe = p
        return recall(index.search(queries, k)[1], truth) >= target

    lo, hi = 0, 1  # lo fails (0: nothing probed), hi is the candidate
    while hi < index.nlist and not reaches(hi):
        lo, hi = hi, min(2 * hi, index.nlist)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    index.nprobe = hi
    return hi
