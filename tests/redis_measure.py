"""Memory per user and per-request latency of the Redis feature store: standalone vs cluster.

Not a test (pytest does not collect it). Starts its own scratch redis-server and local 3-master
cluster (tests/redis_fixtures.py) in a tmp dir and stops them at the end:

    .venv/bin/python tests/redis_measure.py [--users 100000] [--requests 1000] [--bundle DIR]

Memory: N synthetic users, each with 20 recent and 200 seen item indices drawn from a
1M-item catalog and an imp/pos hash, written under the store's key names (`user_key`) in
pipelines of 1,000 users (per node on the cluster); `used_memory` summed over the masters
before and after. Plus the fixed cost of a cluster (one stamp per slot) and of one writer
process (its sequence keys once it has written to every slot).

Latency: Engine.recommend on the tiny bundle (built from configs/tiny.toml into --bundle when
missing), sequential, same users, embedded vs standalone Redis vs cluster; and the two store
reads a Recommend makes (user(), a round trip; item_stats over the coarse ranker's candidates,
from the process's item mirror) on their own.

Seeding and events: a store seeding a synthetic bundle state of --seed-users users, then
applying batches of 1,000 events, on each.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
from redis_fixtures import LocalCluster, RedisServer, redis_server_binary

from engine.core.bundle import load_bundle
from engine.core.config import load_config
from engine.core.runner import Engine
from engine.core.request import Request
from engine.store.redis import RedisStore
from engine.store.redis.keys import SLOTS, slot_tags, stamp_key, user_key
from engine.store.redis.scripts import SEQ_TTL_S
from engine.store.embedded import EmbeddedStore

ROOT = Path(__file__).resolve().parents[1]


def _write_users(clients_for, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for lo in range(0, n, 1000):
        pipes: dict[int, redis.client.Pipeline] = {}
        for u in range(lo, min(lo + 1000, n)):
            k = user_key(f"user-{u}")
            port, client = clients_for(k)
            p = pipes.get(port) or pipes.setdefault(port, client.pipeline(transaction=False))
            p.rpush(k + "recent", *rng.integers(0, 1_000_000, 20).tolist())
            p.rpush(k + "seen", *rng.integers(0, 1_000_000, 200).tolist())
            p.hset(k + "n", mapping={"imp": int(rng.integers(200, 5000)), "pos": int(rng.integers(20, 500))})
        for p in pipes.values():
            p.execute()


def memory(n: int, work: Path) -> None:
    server = RedisServer(redis_server_binary(), work / "standalone")
    cluster = LocalCluster(_mk(work / "cluster"))
    try:
        r = server.client()
        before = int(r.info("memory")["used_memory"])
        _write_users(lambda k: (0, r), n)
        standalone = (int(r.info("memory")["used_memory"]) - before) / n

        clients = {m.port: m.client() for m in cluster.nodes}
        before = cluster.used_memory()
        _write_users(lambda k: (cluster.node_of(k).port, clients[cluster.node_of(k).port]), n)
        per_user = (cluster.used_memory() - before) / n
        counts = {m.port: m.client().dbsize() for m in cluster.nodes}

        before = cluster.used_memory()                      # what seeding adds once: a stamp per slot
        for m in cluster.nodes:
            p = m.client().pipeline(transaction=False)
            for s in range(SLOTS):
                if cluster.node_of(stamp_key(s)) is m:
                    p.set(stamp_key(s), "v20260101-000000-12345")
            p.execute()
        stamps = cluster.used_memory() - before
        before = cluster.used_memory()                      # one writer that has written to every slot
        writer = "0123456789abcdef"
        for m in cluster.nodes:
            p = m.client().pipeline(transaction=False)
            for s in range(SLOTS):
                k = f"ev:{{{slot_tags()[s]}}}:{writer}"
                if cluster.node_of(k) is m:
                    p.set(k, 123456, ex=SEQ_TTL_S)
            p.execute()
        seq = cluster.used_memory() - before
    finally:
        server.stop()
        cluster.close()
    print(f"memory, {n:,} users x (20 recent + 200 seen + imp/pos hash):")
    print(f"  standalone  {standalone:,.0f} B/user   ({standalone * 1e6 / 2**30:.2f} GiB per million users)")
    print(f"  cluster     {per_user:,.0f} B/user   ({per_user * 1e6 / 2**30:.2f} GiB per million users); "
          f"keys per master {sorted(counts.values())}")
    print(f"  cluster fixed: slot stamps {stamps / 2**20:.2f} MiB; per writer process (sequence keys, "
          f"{SEQ_TTL_S // 86400}-day TTL) up to {seq / 2**20:.2f} MiB")


def seeding_and_events(bundle_root: Path, n: int, work: Path) -> None:
    """Seeding speed (a synthetic bundle state of `n` users, full rings) and event throughput
    (batches of 1,000 impressions and clicks over 10,000 users) from one process."""
    import dataclasses

    from engine.core.state import FeatureState
    from engine.core.features import ResolvedEvent

    bundle = load_bundle(bundle_root)
    st, rng = bundle.state, np.random.default_rng(2)
    L, S, items = st.user_recent.shape[1], st.user_seen.shape[1], st.item_n_imp.size
    big = FeatureState(rng.integers(0, items, (n, L)).astype(np.int32), rng.integers(0, items, (n, S)).astype(np.int32),
                       np.full(n, 300, np.float32), np.full(n, 30, np.float32), st.item_n_imp, st.item_n_pos,
                       st.item_hot, st.t_ref, st.time)
    synthetic = dataclasses.replace(bundle, state=big, user_ids=np.array([f"user-{u}" for u in range(n)]),
                                    manifest={**bundle.manifest, "version": bundle.version + "-synthetic"})
    server = RedisServer(redis_server_binary(), _mk(work / "standalone-seed"))
    cluster = LocalCluster(_mk(work / "cluster-seed"))
    print(f"seeding {n:,} users ({L} recent + {S} seen each) and applying events, one process:")
    try:
        for name, url in (("redis", server.url()), ("cluster", cluster.url())):
            t = time.perf_counter()
            store = RedisStore(synthetic, url)
            seed_s = time.perf_counter() - t
            batches = [[ResolvedEvent(kind, -1, f"user-{u}", int(i), store.clock.days())
                        for u, i in zip(rng.integers(0, 10_000, 500).tolist(), rng.integers(0, items, 500).tolist())
                        for kind in ("impression", bundle.tasks[0])] for _ in range(20)]
            t = time.perf_counter()
            for b in batches:
                store.apply(b)
            ev_s = time.perf_counter() - t
            assert store.stats()["buffered"] == 0
            store.close()
            print(f"  {name:9s} seeding {n / seed_s:8,.0f} users/s   events {20_000 / ev_s:8,.0f}/s "
                  f"(batches of 1,000: {ev_s / 20 * 1e3:.1f} ms each)")
    finally:
        server.stop()
        cluster.close()


def _p(ts: list[float], q: float) -> float:
    return float(np.percentile(ts, q) * 1e3)


def latency(bundle_root: Path, requests: int, work: Path) -> None:
    from model_export.build import build_bundle

    cfg = load_config(ROOT / "configs" / "tiny.toml")
    build_bundle(cfg, bundle_root)      # reuses the bundle when it was built from this config
    bundle = load_bundle(bundle_root)
    server = RedisServer(redis_server_binary(), work / "standalone-latency")
    cluster = LocalCluster(_mk(work / "cluster-latency"))
    engines = {"embedded": Engine(cfg, bundle, make_store=EmbeddedStore),
               "redis": Engine(cfg, bundle, store=RedisStore(bundle, server.url())),
               "cluster": Engine(cfg, bundle, store=RedisStore(bundle, cluster.url()))}
    try:
        print(f"Engine.recommend, tiny bundle, sequential, {requests} requests over 200 users, "
              f"the three interleaved (ms):")
        rng = np.random.default_rng(1)
        items = rng.choice(bundle.state.item_n_imp.size, 700, replace=False).astype(np.int32)
        for engine in engines.values():
            for i in range(100):
                engine.recommend(Request(user_id=f"u{i}", count=20))
        ts: dict[str, list[float]] = {name: [] for name in engines}
        tu: dict[str, list[float]] = {name: [] for name in engines}
        ti: dict[str, list[float]] = {name: [] for name in engines}
        for i in range(requests):
            for name, engine in engines.items():
                t = time.perf_counter()
                resp = engine.recommend(Request(user_id=f"u{i % 200}", count=20))
                ts[name].append(time.perf_counter() - t)
                assert not resp.degraded
                t = time.perf_counter()
                engine.store.user(f"u{i % 200}", -1, bundle.tables.default_profile, bundle.tables.user_profile)
                tu[name].append(time.perf_counter() - t)
                t = time.perf_counter()
                engine.store.item_stats(items)
                ti[name].append(time.perf_counter() - t)
        for name in engines:
            t = ts[name]
            print(f"  {name:9s} p50 {_p(t, 50):5.2f}  p90 {_p(t, 90):5.2f}  p99 {_p(t, 99):5.2f}   "
                  f"user() p50 {_p(tu[name], 50):.3f}   item_stats(700) p50 {_p(ti[name], 50):.3f}")
    finally:
        for e in engines.values():
            e.close()
        server.stop()
        cluster.close()


def _mk(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--bundle", type=Path, default=Path(tempfile.gettempdir()) / "recserve-measure-bundle")
    ap.add_argument("--seed-users", type=int, default=50_000)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "standalone").mkdir()
        (work / "standalone-latency").mkdir()
        if not args.skip_memory:
            memory(args.users, work)
        latency(args.bundle, args.requests, work)
        seeding_and_events(args.bundle, args.seed_users, work)


if __name__ == "__main__":
    main()
