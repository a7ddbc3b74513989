"""The Redis store's item mirror (every serving process's local copy of the item counters,
kept current from Redis's item log) and what "accepted" means on Redis, against real
redis-server processes (tests/redis_fixtures.py; see test_store_redis.py for the rest).
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from helpers import wait_for
import redis
from redis_fixtures import RedisServer, redis_server_binary
from redis_fixtures import cluster, db, redis_cluster, redis_server, store_url, user_state  # noqa: F401 - fixtures

from engine.store.redis import mirror as store_mirror
from engine.core.features import ResolvedEvent
from engine.store.embedded import EmbeddedStore
from engine.store.redis import RedisStore
from engine.store.redis.keys import HOT, IMP, LOG, META_SLOT, POS
from test_store import bundle  # noqa: F401 - module fixture reused

pytestmark = [pytest.mark.redis, pytest.mark.slow]


# ------------------------------------------------------------------ 5. the item mirror

def _g(store: RedisStore) -> redis.Redis:
    """A client of the node holding slot g (item counters, meta, the item log)."""
    return store.net.client(store.net.node(META_SLOT), slow=True)


def _in_redis(store: RedisStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every item's counters as Redis holds them (undecayed hot)."""
    f, r = list(range(store.mirror.n_items)), _g(store)
    imp, pos, hot = r.hmget(IMP, f), r.hmget(POS, f), r.zmscore(HOT, f)
    return tuple(np.array([0.0 if x is None else float(x) for x in v]) for v in (imp, pos, hot))


def _mirrors_redis(store: RedisStore) -> bool:
    m = store.mirror.current
    if m is None:
        return False
    imp, pos, hot = _in_redis(store)
    return np.array_equal(m.imp, imp) and np.array_equal(m.pos, pos) and np.allclose(m.hot, hot, rtol=1e-9)


def _clicks(store: RedisStore, bundle, items, user: str = "guest-m") -> list[ResolvedEvent]:
    t = store.clock.days()
    return [ResolvedEvent(k, -1, user, int(i), t) for i in items for k in ("impression", bundle.tasks[0])]


def test_item_write_visible_through_another_store(store_url, bundle):
    """Store A's write: in A's item stats at once (read-your-writes), in B's within its tail
    period; neither reads Redis for them."""
    a, b = RedisStore(bundle, store_url), RedisStore(bundle, store_url)
    try:
        items = np.array([5, 6, 7, 5], np.int32)
        before = [x.copy() for x in b.item_stats(items)]
        a.apply(_clicks(a, bundle, items.tolist()))
        got = a.item_stats(items)
        np.testing.assert_array_equal(got[0], before[0] + [2, 1, 1, 2])
        np.testing.assert_array_equal(got[1], before[1] + [2, 1, 1, 2])
        assert np.all(got[2] > before[2])
        t0 = time.monotonic()
        wait_for(lambda: np.array_equal(b.item_stats(items)[0], got[0]), timeout=2, what="A's write in B's mirror")
        seen_after = time.monotonic() - t0
        seen = b.item_stats(items)
        assert np.array_equal(seen[1], got[1])
        np.testing.assert_allclose(seen[2], got[2], rtol=1e-4)   # hot decays with the clock between reads
        assert np.array_equal(a.hot_top(20)[0], b.hot_top(20)[0])
        assert _mirrors_redis(a) and _mirrors_redis(b)
        assert not a.fell_back() and not b.fell_back()
        assert 0 <= b.stats()["mirror_lag_ms"] < 1000
        print(f"\nA's write seen through B after {seen_after * 1e3:.0f} ms")
    finally:
        a.close()
        b.close()


def test_mirror_behind_a_trimmed_log_reloads(store_url, bundle, monkeypatch):
    """B stops tailing, A writes, the log is trimmed past what B read: B reloads in full."""
    a, b = RedisStore(bundle, store_url), RedisStore(bundle, store_url)
    try:
        monkeypatch.setattr(b.mirror, "tail", lambda: None)
        rng = np.random.default_rng(1)
        for _ in range(20):
            a.apply(_clicks(a, bundle, rng.integers(0, a.mirror.n_items, 10).tolist()))
        _g(a).xtrim(LOG, maxlen=0, approximate=False)
        a.apply(_clicks(a, bundle, [9]))
        assert not _mirrors_redis(b)
        monkeypatch.undo()
        wait_for(lambda: b.stats().get("mirror_reloads", 0) >= 1, timeout=5, what="B reloads")
        wait_for(lambda: _mirrors_redis(b), timeout=5, what="B's mirror == Redis")
        assert _mirrors_redis(a) and not b.fell_back()
    finally:
        a.close()
        b.close()


def test_mirror_load_is_exact_under_concurrent_writes(store_url, bundle, monkeypatch):
    """Full loads (in small chunks) while another store writes: each chunk's read and the log
    replay over it give exactly Redis's counters, nothing counted twice or missed."""
    monkeypatch.setattr(store_mirror, "MIRROR_CHUNK", 64)
    a = RedisStore(bundle, store_url)
    stop, stores = threading.Event(), []
    rng = np.random.default_rng(2)

    def write() -> None:
        while not stop.is_set():
            a.apply(_clicks(a, bundle, rng.integers(0, a.mirror.n_items, 20).tolist(), user=f"guest-{rng.integers(50)}"))

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(3):
            stores.append(RedisStore(bundle, store_url))   # loads at start, under the writes
            assert stores[-1].mirror.load()               # and once more
            stores[-1].apply(_clicks(stores[-1], bundle, [1, 2, 3]))   # its own writes too
        stop.set()
        writer.join()
        for s in (a, *stores):
            wait_for(lambda: _mirrors_redis(s), timeout=5, what="mirror == Redis")
    finally:
        stop.set()
        writer.join()
        for s in (a, *stores):
            s.close()


def test_reseed_makes_every_mirror_reload(store_url, bundle):
    """The DB comes back empty (here: flushed): it is re-seeded with the bundle's state and
    every mirror reloads it, instead of adding new deltas to counters Redis no longer has."""
    a, b = RedisStore(bundle, store_url), RedisStore(bundle, store_url)
    try:
        items = np.arange(20, dtype=np.int32)
        a.apply(_clicks(a, bundle, items.tolist()))
        wait_for(lambda: _mirrors_redis(b), timeout=5, what="B caught up")
        assert not np.array_equal(b.item_stats(items)[0], bundle.state.item_n_imp[items])
        for s in (a, b):
            loads = s.stats()["mirror_loads"]
            assert loads == 1
        if store_url.startswith("rediscluster://"):
            for node in a.net.primaries():
                a.net.client(node, slow=True).flushdb()
        else:
            _g(a).flushdb()
        emb = EmbeddedStore(bundle)

        def reloaded(s) -> bool:
            return (s.stats()["mirror_loads"] >= 2 and _mirrors_redis(s)
                    and all(np.allclose(x, y) for x, y in zip(s.item_stats(items), emb.item_stats(items))))

        wait_for(lambda: reloaded(a) and reloaded(b), timeout=10, what="both mirrors reloaded the re-seeded DB")
        a.fell_back(), b.fell_back()
        a.apply(_clicks(a, bundle, [3]))          # and they follow the new log
        wait_for(lambda: _mirrors_redis(b), timeout=5, what="B follows the new log")
        assert not b.fell_back()
    finally:
        a.close()
        b.close()


def test_mirror_serves_through_an_outage(redis_server, db, bundle, monkeypatch):
    """Redis unreachable: item stats keep coming from the mirror (newer than the bundle),
    unflagged until it has not synced for MIRROR_STALE_S, then flagged; stats say how stale."""
    store = RedisStore(bundle, redis_server.url(db))
    try:
        store.apply(_clicks(store, bundle, [5]))
        want = store.item_stats(np.array([5], np.int32))
        assert want[0][0] == bundle.state.item_n_imp[5] + 1
        redis_server.stop()
        time.sleep(0.6)
        got = store.item_stats(np.array([5], np.int32))
        assert got[0][0] == want[0][0] and not store.fell_back()
        assert store.stats()["mirror_lag_ms"] >= 400
        monkeypatch.setattr(store_mirror, "MIRROR_STALE_S", 0.2)
        got = store.item_stats(np.array([5], np.int32))
        assert got[0][0] == want[0][0] and store.fell_back()   # still the mirror's values, flagged stale
        assert store.hot_top(5)[0].size == 5 and store.fell_back()
        monkeypatch.undo()
        redis_server.start()   # back empty: re-seeded (the click is lost with Redis), mirror reloaded
        wait_for(lambda: store.stats()["up"] and store.stats()["mirror_lag_ms"] < 1000
                 and store.item_stats(np.array([5], np.int32))[0][0] == bundle.state.item_n_imp[5],
                 timeout=10, what="re-seeded and reloaded")
        store.fell_back()
        assert store.item_stats(np.array([5], np.int32))[0][0] == bundle.state.item_n_imp[5] and not store.fell_back()
    finally:
        if not redis_server.running():
            redis_server.start()
        store.close()


# ------------------------------------------------------------------ 6. what "accepted" means on Redis

def test_events_buffered_when_the_server_stops_are_lost(bundle, tmp_path):
    """The Redis store's stated limit (docs/feature_store.md, "What 'accepted' guarantees"): an
    event written to Redis is Redis's to keep (here with AOF: it survives a Redis restart); an
    event accepted while Redis is down lives only in the worker's buffer, and a store that stops
    before Redis returns loses it."""
    server = RedisServer(redis_server_binary(), tmp_path, extra=("--appendonly", "yes", "--appendfsync", "always"))
    store = RedisStore(bundle, server.url())
    try:
        store.apply([ResolvedEvent("impression", -1, "guest-accepted", 5, store.clock.days())])
        assert store.stats()["buffered"] == 0                   # written: in Redis's AOF
        server.stop()
        store.apply([ResolvedEvent("impression", -1, "guest-accepted", 6, store.clock.days())])
        assert store.stats()["buffered"] == 1                   # accepted, only in this process
    finally:
        store.close(flush_s=0.3)                                # Redis still down: logged as lost
        if not server.running():
            server.start()
    again = RedisStore(bundle, server.url())
    try:
        assert user_state(again, bundle, "guest-accepted").seen[:2].tolist() == [5, -1]
    finally:
        again.close()
        server.stop()
