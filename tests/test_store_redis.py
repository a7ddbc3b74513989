"""The Redis feature store against a real redis-server (Debian package) on a loopback port.

The module's redis-server is started with `--save '' --appendonly no` in a tmp dir, so a
restart comes back empty, the worst case for the store: it must re-seed and replay its buffer.
Each test uses its own DB number and builds its stores after Redis is up. Tests taking
`store_url` run twice: on that server and on a local 3-master Redis Cluster
(tests/redis_fixtures.py; the cluster's own tests are in test_store_redis_cluster.py).
"""
from __future__ import annotations

import itertools
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from helpers import wait_for
import redis
from redis_fixtures import RedisServer, redis_server_binary
from redis_fixtures import cluster, median_recommend_ms, redis_cluster, redis_server  # noqa: F401 - fixtures

from engine.store.redis import mirror as store_mirror
from engine.core.config import load_config
from engine.core.runner import Engine
from engine.core.request import Event, Request
from engine.core.errors import Overloaded
from engine.core.features import ResolvedEvent
from engine.store.embedded import EmbeddedStore
from engine.store.redis import RedisStore
from engine.store.redis.keys import CATALOG, HOT, IMP, LOCK, LOG, META, META_SLOT, POS, user_key
from engine.store.redis.seeding import Seeder
from test_store import bundle, check_replay, models, world  # noqa: F401 - module fixtures reused

pytestmark = [pytest.mark.redis, pytest.mark.slow]


_dbs = itertools.count(1)


@pytest.fixture
def db(redis_server) -> int:
    """A DB number of its own for each test (16 per server)."""
    return next(_dbs) % 16


@pytest.fixture(params=["redis", "rediscluster"])
def store_url(request) -> str:
    """A fresh standalone DB, or the (emptied) local cluster."""
    if request.param == "redis":
        return request.getfixturevalue("redis_server").url(request.getfixturevalue("db"))
    return request.getfixturevalue("cluster").url()


def _user(store, bundle, user_id: str, index: int = -1):
    return store.user(user_id, index, bundle.tables.default_profile, bundle.tables.user_profile)


# ------------------------------------------------------------------ 1. one interface, seeding

def test_seeded_once_then_shared(redis_server, db, bundle, monkeypatch):
    seeds = []
    real_seed = Seeder.seed
    monkeypatch.setattr(Seeder, "seed", lambda self, token: seeds.append(1) or real_seed(self, token))
    stores: list[RedisStore] = []
    threads = [threading.Thread(target=lambda: stores.append(RedisStore(bundle, redis_server.url(db))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(seeds) == 1 and all(s.stats()["up"] for s in stores)
        r = redis_server.client(db)
        assert r.get(META).decode() == bundle.version and not r.exists(LOCK) and r.exists(CATALOG)
        emb = EmbeddedStore(bundle)
        for u in (0, 1, 17):   # seeded state == the bundle's state, read through the same interface
            a, b = _user(stores[0], bundle, str(bundle.user_ids[u]), u), _user(emb, bundle, str(bundle.user_ids[u]), u)
            assert np.array_equal(a.recent, b.recent) and np.array_equal(a.seen, b.seen)
            assert (a.n_imp, a.n_pos) == (b.n_imp, b.n_pos)
        items = np.arange(0, bundle.state.item_n_imp.size, 3, dtype=np.int32)
        for x, y in zip(stores[0].item_stats(items), emb.item_stats(items)):
            np.testing.assert_allclose(x, y, rtol=1e-6)
        assert np.array_equal(stores[0].hot_top(50)[0], emb.hot_top(50)[0])

        stores[1].apply([ResolvedEvent("impression", -1, "guest-a", 5, stores[1].clock.days())])
        late = RedisStore(bundle, redis_server.url(db))   # a server started later: no second seeding
        stores.append(late)
        assert len(seeds) == 1
        assert _user(late, bundle, "guest-a").seen[0] == 5 == _user(stores[2], bundle, "guest-a").seen[0]
        assert not any(s.fell_back() for s in stores)
    finally:
        for s in stores:
            s.close()


# ------------------------------------------------------------------ 2. offline/online consistency

def test_serving_features_equal_training_features_on_redis(store_url, bundle, world, models):
    check_replay(bundle, world, models, lambda b: RedisStore(b, store_url))


def test_one_round_trip_per_request(redis_server, db, bundle, tiny_config, monkeypatch):
    """A request's reads: one pipeline for the user (recent + seen + counters); the candidates'
    item stats (imp, pos, hot) come from the local mirror, no round trip. Prints the latency
    overhead against embedded."""
    cfg = load_config(tiny_config)
    sends: dict[int, int] = {}
    real_send = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sends[threading.get_ident()] = sends.get(threading.get_ident(), 0) + 1
        return real_send(self, command, check_health)

    engines = {"redis": Engine(cfg, bundle, store=RedisStore(bundle, redis_server.url(db))),
               "embedded": Engine(cfg, bundle, make_store=EmbeddedStore)}
    try:
        ms = {name: median_recommend_ms(engine) for name, engine in engines.items()}
        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
        me = threading.get_ident()
        for i in range(20):
            engines["redis"].recommend(Request(user_id=f"u{i}", count=20))
        assert sends.get(me, 0) == 20, sends
        print(f"\nRecommend p50: redis {ms['redis']:.2f} ms, embedded {ms['embedded']:.2f} ms "
              f"(+{ms['redis'] - ms['embedded']:.2f} ms); 1 Redis round trip per request")
    finally:
        for e in engines.values():
            e.close()


# ------------------------------------------------------------------ 3. faults

def test_redis_down_fails_open_buffers_and_converges(redis_server, db, bundle, tiny_config):
    cfg = load_config(tiny_config)
    store = RedisStore(bundle, redis_server.url(db), event_buffer=50)
    engine = Engine(cfg, bundle, store=store)
    try:
        assert not engine.recommend(Request(user_id="guest-outage", count=20)).degraded
        redis_server.stop()
        resp = engine.recommend(Request(user_id="guest-outage", count=20))
        assert resp.degraded and len(resp.item_ids) == 20
        hidden = [x for x in resp.item_ids if x != "i10"][:5]
        item = bundle.item_ids.tolist().index(hidden[0])
        assert engine.report_events([Event("impression", "guest-outage", x, 0) for x in hidden]) == (5, [])
        assert engine.report_events([Event("impression", "u3", hidden[0], 0)]) == (1, [])
        s = store.stats()
        assert s["buffered"] == 6 and s["up"] == 0 and s["fallbacks"] > 0 and s["dropped"] == 0
        with pytest.raises(Overloaded, match="event_buffer"):   # full: refused loudly, never dropped
            engine.report_events([Event("impression", "u4", hidden[0], 0)] * 45)
        assert store.stats()["rejected"] == 45

        redis_server.start()                                    # back, and empty: re-seed, then replay
        wait_for(lambda: store.stats()["up"] and not store.stats()["buffered"], what="buffer flushed")
        r = redis_server.client(db)
        seen = [int(x) for x in r.lrange(user_key("guest-outage") + "seen", 0, -1)]
        assert seen == [bundle.item_ids.tolist().index(x) for x in reversed(hidden)]   # in order
        assert int(r.hget(IMP, item)) == int(bundle.state.item_n_imp[item]) + 2
        assert store.stats()["retried"] == 6
        again = engine.recommend(Request(user_id="guest-outage", count=20))
        assert not again.degraded and not set(again.item_ids) & set(hidden)
    finally:
        if redis_server.proc.poll() is not None:
            redis_server.start()
        engine.close()


def test_slow_redis_bounded_latency_and_exactly_once(redis_server, db, bundle, tiny_config):
    """A frozen Redis (SIGSTOP) costs a request one socket timeout, not a hang; a write whose
    reply was lost is applied once even though it is retried."""
    cfg = load_config(tiny_config)
    store = RedisStore(bundle, redis_server.url(db))
    engine = Engine(cfg, bundle, store=store)
    item_id = bundle.item_ids[11]
    before = int(redis_server.client(db).hget(IMP, 11) or 0)
    try:
        engine.recommend(Request(user_id="u8", count=20))
        redis_server.pause()
        t = time.perf_counter()
        engine.report_events([Event("impression", "u8", item_id, 0)] * 3)   # times out: buffered
        slowest = time.perf_counter() - t
        for _ in range(5):
            t = time.perf_counter()
            assert engine.recommend(Request(user_id="u8", count=20)).degraded
            slowest = max(slowest, time.perf_counter() - t)
        engine.report_events([Event("impression", "u8", item_id, 0)] * 2)
        assert slowest < 0.5, slowest
        assert store.stats()["buffered"] == 5
        time.sleep(0.5)
        redis_server.resume()
        wait_for(lambda: store.stats()["up"] and not store.stats()["buffered"], what="buffer flushed")
        assert int(redis_server.client(db).hget(IMP, 11)) == before + 5
        assert not engine.recommend(Request(user_id="u8", count=20)).degraded
    finally:
        redis_server.resume()
        engine.close()


# ------------------------------------------------------------------ 4. several servers, one store

def test_an_event_on_one_server_changes_the_other(store_url, tiny_bundle, tiny_config, tmp_path):
    from test_server import Server

    args = ("--feature-store", store_url)
    a = Server(tmp_path, tiny_config, tiny_bundle, workers=1, extra=args)
    b = Server(tmp_path, tiny_config, tiny_bundle, workers=2, extra=args)
    try:
        with a.client() as ca, b.client() as cb:
            served = [it.item_id for it in cb.recommend("guest-shared", count=10).items]
            hidden = [x for x in served if x != "i10"][:5]
            assert ca.report_events([{"kind": "impression", "user_id": "guest-shared", "item_id": x}
                                     for x in hidden]).accepted == 5
            again = cb.recommend("guest-shared", count=10)
            assert not again.degraded and not set(hidden) & {it.item_id for it in again.items}
    finally:
        assert a.terminate() == 0 and b.terminate() == 0


def test_redis_restart_under_load(redis_server, db, bundle, tiny_bundle, tiny_config, tmp_path):
    """Recommend never fails while Redis is stopped and restarted (empty); every event
    acknowledged during the outage is in Redis afterwards."""
    from test_server import Server

    server = Server(tmp_path, tiny_config, tiny_bundle, workers=2, extra=("--feature-store", redis_server.url(db)))
    stop, calls, failures, degraded = threading.Event(), [0], [], [0]

    def load() -> None:
        with server.client() as c:
            for i in itertools.count():
                if stop.is_set():
                    return
                try:
                    degraded[0] += c.recommend(f"u{i % 100}", count=10).degraded
                    calls[0] += 1
                except grpc.RpcError as e:
                    failures.append(f"{e.code().name}: {e.details()}")

    thread = threading.Thread(target=load)
    thread.start()
    acked: list[tuple[str, str]] = []
    try:
        time.sleep(1.0)
        redis_server.stop()
        with server.client() as c:
            for k in range(40):
                user, item = ("guest-load" if k % 2 else "u7"), f"i{100 + k}"
                if c.report_events([{"kind": "impression", "user_id": user, "item_id": item}]).accepted:
                    acked.append((user, item))
            time.sleep(1.0)
            redis_server.start()
            r = redis_server.client(db)
            index = {x: k for k, x in enumerate(bundle.item_ids.tolist())}

            def all_in_redis() -> bool:
                return all(r.lpos(user_key(u) + "seen", index[i]) is not None for u, i in acked)

            wait_for(all_in_redis, what="every acknowledged event in Redis")
            time.sleep(1.0)
            counters = dict(c.status().counters)
    finally:
        stop.set()
        thread.join()
        assert server.terminate() == 0
    assert len(acked) == 40
    assert not failures, failures[:5]
    assert calls[0] > 20 and degraded[0] > 0
    assert counters["store.dropped"] == 0 and counters["store.up"] == 1 and counters["store.buffered"] == 0


def test_new_model_bundle_over_the_same_catalog_keeps_live_state(store_url, tiny_bundle, tmp_path):
    """A model update must not lose events accepted since the last bundle."""
    import json

    from engine.core.bundle import load_bundle

    old = load_bundle(tiny_bundle)
    store = RedisStore(old, store_url)
    u = int(np.flatnonzero(old.state.user_n_imp > 0)[0])   # a seeded user: re-seeding would reset it
    store.apply([ResolvedEvent("click", -1, "adopt-user", 7, store.clock.days()),
                 ResolvedEvent("impression", u, str(old.user_ids[u]), 9, store.clock.days())])
    store.close()
    newer = tmp_path / "v99999999-000000-1"          # same files, a newer version name
    shutil.copytree(old.path, newer)
    m = json.loads((newer / "manifest.json").read_text())
    m["version"] = newer.name
    (newer / "manifest.json").write_text(json.dumps(m))
    store = RedisStore(load_bundle(newer), store_url)
    try:
        assert 7 in _user(store, old, "adopt-user").recent[0]
        seen = _user(store, old, str(old.user_ids[u]), u).seen        # kept (cluster: slots re-stamped)
        assert seen[0] == 9 and np.array_equal(seen[1:], old.state.user_seen[u][:-1])
        assert store.stats()["up"] and not store.fell_back()
    finally:
        store.close()


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
        assert _user(again, bundle, "guest-accepted").seen[:2].tolist() == [5, -1]
    finally:
        again.close()
        server.stop()
