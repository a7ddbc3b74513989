"""CPU of each recall route, its background refresh, and the merge, on a real bundle.

    python -m loadtest.bench_recall --config configs/large.toml --bundle bundles/large

Each route is called on the contexts of Zipf-drawn users (as the load generator draws them),
timed by this thread's CPU clock, twice: warm (its data in cache from the previous call) and
cold (a 64 MB scan between calls evicts the caches, as the rest of a request does), then
each refreshed route's rebuild, the merge of the routes' real outputs, and the cold-start
pool's top-k by `engine.core.candidates.top_k` against a full argpartition.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import numpy as np

from engine.core.bundle import load_bundle
from engine.core.candidates import merge, top_k
from engine.core.config import load_config
from engine.core.request import Request
from engine.core.runner import Engine
from engine.store.embedded import EmbeddedStore
from loadtest.generator import Users


def cpu_ms(fn: Callable[[], object], reps: int, between: Callable[[], object] | None = None) -> float:
    """Median CPU ms of `fn` over `reps` calls (`between` runs untimed before each)."""
    out = []
    for _ in range(reps):
        if between:
            between()
        t = time.thread_time()
        fn()
        out.append(time.thread_time() - t)
    return float(np.median(out) * 1e3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_recall", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--users", type=int, default=100)
    a = p.parse_args(argv)
    b = load_bundle(a.bundle)
    engine = Engine(load_config(a.config), b, make_store=EmbeddedStore)
    users = Users(b.user_ids, 1.1, 0.05, 0, 0)
    ctxs = [engine.hydrate(Request(user_id=users.next())) for _ in range(a.users)]
    big = np.ones(16 * 2**20, np.float32)
    it = iter(range(10**9))

    def next_ctx():
        return ctxs[next(it) % len(ctxs)]

    print(f"bundle {b.version}: CPU ms per call, median over {a.users} users")
    parts = []
    for st in engine.pipeline().recall:
        warm = cpu_ms(lambda: st.fn(next_ctx()), a.users)
        cold = cpu_ms(lambda: st.fn(next_ctx()), a.users, big.sum)
        line = f"  {st.name:12s} call warm {warm:.3f}  cold {cold:.3f}"
        if hasattr(st.fn, "_refresh"):
            line += f"  refresh {cpu_ms(st.fn._refresh, 10):.3f}"
        print(line)
        parts.append(st.fn(ctxs[0]))
    print(f"  merge of {sum(len(x) for x in parts)} rows: {cpu_ms(lambda: merge(parts), 500):.3f}")
    cold = next((st.fn for st in engine.pipeline().recall if st.spec.kind == "recall_cold_start"), None)
    if cold is not None:
        pool, emb = cold._snap
        sims = [emb @ c.user_e[0] for c in ctxs]
        k = cold.p.k - int(round(cold.p.k * cold.p.explore_share))
        tk = cpu_ms(lambda: top_k(sims[next(it) % len(sims)], k), 300)
        ap = cpu_ms(lambda: np.argpartition(sims[next(it) % len(sims)], pool.size - k), 300)
        print(f"  cold pool of {pool.size}: top-{k} by top_k {tk:.3f}, by argpartition {ap:.3f}")
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
