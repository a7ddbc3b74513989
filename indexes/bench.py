"""Pick the ANN config for a large catalog: build time, size, single-query latency and recall@k.

Synthetic but clustered like real item embeddings: ~500 gaussian clusters of power-law sizes
and varied spread, L2-normalised. Queries are half noisy cluster means (a user with a broad
taste) and half noisy items (a narrow taste). nprobe is tuned on one query set and latency and
recall reported on another, through the mmap'd index the server loads.

    python -m indexes.bench --n 1000000 --d 32
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from indexes import FaissIndex, build_index, exact_ids, load_index, recall, tune_nprobe


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, clusters: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Items [n, d] and queries [n_queries, d], float32 on the unit sphere."""
    rng = np.random.default_rng(seed)
    centers = _unit(rng.standard_normal((clusters, d), dtype=np.float32))
    weight = 1.0 / np.arange(1, clusters + 1)
    weight /= weight.sum()
    spread = rng.uniform(0.3, 1.2, clusters).astype(np.float32)  # cosine to centre ~0.96 .. 0.64
    emb = np.empty((n, d), np.float32)
    for i in range(0, n, 200_000):  # chunks keep the float64-free peak small
        c = rng.choice(clusters, size=min(200_000, n - i), p=weight)
        noise = rng.standard_normal((len(c), d), dtype=np.float32) / np.sqrt(d)
        emb[i:i + len(c)] = _unit(centers[c] + spread[c, None] * noise)
    half = n_queries // 2
    broad = centers[rng.choice(clusters, size=half, p=weight)]
    narrow = emb[rng.integers(0, n, n_queries - half)]
    noise = rng.standard_normal((n_queries, d), dtype=np.float32) / np.sqrt(d)
    queries = _unit(np.concatenate([broad, narrow]) + 0.5 * noise)
    return emb, rng.permutation(queries).astype(np.float32)


def latency_ms(index: FaissIndex, queries: np.ndarray, k: int) -> tuple[float, float, float]:
    """Wall p50, p99 and CPU p50 of one-query searches, as the server issues them.

    With one search thread the CPU time is this thread's, so it holds up on a shared machine.
    """
    for q in queries[:20]:
        index.search(q[None], k)
    wall, cpu = [], []
    for q in queries:
        t, c = time.perf_counter(), time.thread_time()
        index.search(q[None], k)
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    return float(np.percentile(wall, 50) * 1e3), float(np.percentile(wall, 99) * 1e3), float(np.median(cpu) * 1e3)


@dataclass
class Row:
    kind: str
    nlist: int
    nprobe: int
    build_s: float
    mb: float
    recall: float
    scanned: int
    p50_ram: float
    p50: float
    p99: float
    cpu: float

    HEAD = (f"{'kind':<9}{'nlist':>6}{'nprobe':>7}{'build s':>8}{'MB':>7}{'recall':>8}{'scanned':>9}"
            f"{'p50 ram':>9}{'p50 mmap':>9}{'p99 mmap':>9}{'cpu p50':>8}")

    def __str__(self) -> str:
        return (f"{self.kind:<9}{self.nlist:>6}{self.nprobe:>7}{self.build_s:>8.1f}{self.mb:>7.0f}"
                f"{self.recall:>8.3f}{self.scanned:>9}{self.p50_ram:>9.2f}{self.p50:>9.2f}{self.p99:>9.2f}"
                f"{self.cpu:>8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--clusters", type=int, default=500)
    ap.add_argument("--kinds", default="ivf_sq8,ivf_flat")
    ap.add_argument("--nlists", default="1024,2048,4096,8192")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--tune-queries", type=int, default=200)
    ap.add_argument("--queries", type=int, default=500, help="held-out queries for recall and latency")
    ap.add_argument("--threads", type=int, default=1, help="per search call and for the build")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t = time.perf_counter()
    emb, queries = clustered(args.n, args.d, args.clusters, args.tune_queries + args.queries, args.seed)
    tune_q, eval_q = queries[:args.tune_queries], queries[args.tune_queries:]
    truth = exact_ids(emb, eval_q, args.k)
    print(f"data {args.n} x {args.d}, {args.clusters} clusters, k={args.k}, target recall {args.target}, "
          f"threads {args.threads}: {time.perf_counter() - t:.1f} s")

    rows: list[Row] = []
    configs = [("flat", 1)] + [(kind, int(nl)) for kind in args.kinds.split(",") for nl in args.nlists.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for kind, nlist in configs:
            t = time.perf_counter()
            index = build_index(emb, kind, nlist, 1, max(100_000, 39 * nlist), threads=args.threads)
            build_s = time.perf_counter() - t
            index.threads = args.threads
            nprobe = tune_nprobe(index, emb, tune_q, args.k, args.target)
            path = Path(tmp) / f"{kind}_{nlist}.faiss"
            index.save(path)
            loaded = load_index(path, threads=args.threads)
            p50, p99, cpu = latency_ms(loaded, eval_q, args.k)
            faiss.cvar.indexIVF_stats.reset()
            found = loaded.search(eval_q, args.k)[1]
            scanned = faiss.cvar.indexIVF_stats.ndis // len(eval_q) if kind != "flat" else args.n
            row = Row(kind, index.nlist, nprobe, build_s, path.stat().st_size / 2**20, recall(found, truth),
                      scanned, latency_ms(index, eval_q, args.k)[0], p50, p99, cpu)
            print(row if rows else f"{Row.HEAD}\n{row}", flush=True)
            rows.append(row)
            del index, loaded
            path.unlink()
    best = min(rows, key=lambda r: r.cpu)
    print(f"\nlowest CPU per query, every row tuned to recall {args.target}:\n{Row.HEAD}\n{best}")


if __name__ == "__main__":
    main()
