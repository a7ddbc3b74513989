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
from redis_fixtures import cluster, db, median_recommend_ms, redis_cluster, redis_server, store_url, user_state  # noqa: F401 - fixtures

from engine.core.config import load_config
from engine.core.runner import Engine
from engine.core.request import Event, Request
from engine.core.errors import Overloaded
from engine.core.features import ResolvedEvent
from engine.store.embedded import EmbeddedStore
from engine.store.redis import RedisStore
from engine.store.redis.keys import CATALOG, IMP, LOCK, META, user_key
from engine.store.redis.seeding import Seeder
from test_store import bundle, check_replay, models, world  # noqa: F401 - module fixtures reused

pytestmark = [pytest.mark.redis, pytest.mark.slow]


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
            a, b = user_state(stores[0], bundle, str(bundle.user_ids[u]), u), user_state(emb, bundle, str(bundle.user_ids[u]), u)
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
        assert user_state(late, bundle, "guest-a").seen[0] == 5 == user_state(stores[2], bundle, "guest-a").seen[0]
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
        assert 7 in user_state(store, old, "adopt-user").recent[0]
        seen = user_state(store, old, str(old.user_ids[u]), u).seen        # kept (cluster: slots re-stamped)
        assert seen[0] == 9 and np.array_equal(seen[1:], old.state.user_seen[u][:-1])
        assert store.stats()["up"] and not store.fell_back()
    finally:
        store.close()


def test_a_store_started_after_a_hot_roll_follows_the_db_of_the_rolled_ones(store_url, tiny_bundle, tmp_path):
    """A hot roll (Engine.swap_bundle) keeps each process's store and so the DB's stamp; a process
    started afterwards on the rolled bundle (a Ray replica restarted or added) must share that
    state, whichever way the versions sort: a newer name used to take the DB over (the rolled
    processes then served the bundle's state, degraded, for good), an older one to refuse it."""
    import json

    from engine.core.bundle import load_bundle
    from engine.store.redis.keys import META, META_SLOT

    def renamed(name: str):
        shutil.copytree(old.path, tmp_path / name)
        m = json.loads((tmp_path / name / "manifest.json").read_text())
        m["version"] = name
        (tmp_path / name / "manifest.json").write_text(json.dumps(m))
        return load_bundle(tmp_path / name)

    old = load_bundle(tiny_bundle)
    rolled = RedisStore(old, store_url)       # what a replica that hot-swapped keeps serving with
    stores = [rolled]
    try:
        for k, name in enumerate(("a-roll", "v99999999-000000-roll")):    # sorts before / after old
            late = RedisStore(renamed(name), store_url)
            stores.append(late)
            late.apply([ResolvedEvent("impression", -1, f"late-{k}", 11 + k, late.clock.days())])
            rolled.apply([ResolvedEvent("impression", -1, f"rolled-{k}", 21 + k, rolled.clock.days())])
            for s in (rolled, late):
                assert user_state(s, old, f"late-{k}").seen[0] == 11 + k
                assert user_state(s, old, f"rolled-{k}").seen[0] == 21 + k
                assert s.stats()["up"] and not s.fell_back(), name
        meta = rolled.net.client(rolled.net.node(META_SLOT), slow=True).get(META)
        assert meta.decode() == old.version                       # nobody took the DB over
    finally:
        for s in stores:
            s.close()
