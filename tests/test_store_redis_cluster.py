"""The Redis feature store on a real local Redis Cluster: 3 masters, no replicas, no persistence.

The cluster (tests/redis_fixtures.py) is started once per run and emptied before each test.
What is checked here is what a cluster adds to the standalone store (test_store_redis.py,
whose `store_url` tests also run on this cluster): users spread over the shards with each
user's keys on one, one round trip per kind of feature, the per-slot event apply (exactly once
across stores and retries), and a shard going away and coming back empty.
"""
from __future__ import annotations

import collections
import threading
import time

import numpy as np
import pytest
from helpers import wait_for
import redis
from redis_fixtures import cluster, median_recommend_ms, redis_cluster, redis_server  # noqa: F401 - fixtures
from redis_fixtures import user_state

from engine.core.config import load_config
from engine.core.runner import Engine
from engine.core.request import Event, Request
from engine.core.features import ResolvedEvent
from engine.store.common import state_user
from engine.store.embedded import EmbeddedStore
from engine.store.redis import RedisStore
from engine.store.redis.keys import IMP, META, META_SLOT, user_key, user_slot
from test_store import bundle  # noqa: F401 - module fixture reused

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _port_of_user(cluster, user_id: str) -> int:
    return cluster.node_of(user_key(user_id) + "n").port


def _same(a, b) -> bool:
    return (np.array_equal(a.recent, b.recent) and np.array_equal(a.seen, b.seen)
            and (a.n_imp, a.n_pos) == (b.n_imp, b.n_pos))


# ------------------------------------------------------------------ layout

def test_users_spread_over_the_shards_each_user_on_one(cluster, bundle):
    store = RedisStore(bundle, cluster.url())
    try:
        store.apply([ResolvedEvent("impression", -1, f"guest-{{odd}}-{i}", i, store.clock.days()) for i in range(300)])
        owner: dict[str, set[int]] = collections.defaultdict(set)
        kinds: dict[str, set[str]] = collections.defaultdict(set)
        for n in cluster.nodes:
            for key in n.client().scan_iter("u:*", count=1000):
                user, kind = key.decode().split("}:", 1)[1].rsplit(":", 1)
                owner[user].add(n.port)
                kinds[user].add(kind)
        seeded = int(((bundle.state.user_n_imp > 0) | (bundle.state.user_n_pos > 0)).sum())
        assert len(owner) == seeded + 300
        assert all(len(ports) == 1 for ports in owner.values())          # a user's keys: one shard
        assert all(k == {"seen", "n"} for u, k in kinds.items() if u.startswith("guest-"))
        per_node = collections.Counter(next(iter(p)) for p in owner.values())
        assert len(per_node) == 3 and min(per_node.values()) > 0.25 * len(owner), per_node
        meta = cluster.node_of(META)                                     # item counters and meta: one shard
        assert meta.client().exists(META, IMP) == 2
        assert all(not list(n.client().scan_iter("[mi][et]*:{g}:*")) for n in cluster.nodes if n is not meta)
    finally:
        store.close()


# ------------------------------------------------------------------ cost of a request

def test_one_round_trip_per_request_on_the_cluster(cluster, redis_server, bundle, tiny_config, monkeypatch):
    """A Recommend sends one pipeline, to the user's shard (item stats come from the local
    mirror), whatever the cluster does meanwhile. Prints the latency against standalone Redis
    and embedded."""
    cfg = load_config(tiny_config)
    sends: list[tuple[int, int]] = []
    real_send = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sends.append((threading.get_ident(), self.port))
        return real_send(self, command, check_health)

    engines = {"cluster": Engine(cfg, bundle, store=RedisStore(bundle, cluster.url())),
               "redis": Engine(cfg, bundle, store=RedisStore(bundle, redis_server.url(15))),
               "embedded": Engine(cfg, bundle, make_store=EmbeddedStore)}
    try:
        ms = {name: median_recommend_ms(engine) for name, engine in engines.items()}
        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
        me = threading.get_ident()
        users = [f"u{i}" for i in range(20)]
        for user in users:
            sends.clear()
            engines["cluster"].recommend(Request(user_id=user, count=20))
            mine = [port for t, port in sends if t == me]
            assert mine == [_port_of_user(cluster, user)], (user, mine)
        assert len({_port_of_user(cluster, u) for u in users}) == 3   # the 20 users were on all shards
        print(f"\nRecommend p50: cluster {ms['cluster']:.2f} ms, redis {ms['redis']:.2f} ms, "
              f"embedded {ms['embedded']:.2f} ms; 1 round trip per request (user shard; items: local mirror)")
    finally:
        for e in engines.values():
            e.close()


# ------------------------------------------------------------------ several stores, one cluster

def test_events_through_one_store_visible_through_another(cluster, bundle):
    """Two stores (two servers) on one cluster; the events of a batch span every shard."""
    a, b = RedisStore(bundle, cluster.url()), RedisStore(bundle, cluster.url())
    emb = EmbeddedStore(bundle)
    try:
        t = a.clock.days()
        rng = np.random.default_rng(0)
        users = [(u, str(bundle.user_ids[u])) for u in rng.choice(len(bundle.user_ids), 40, replace=False).tolist()]
        users += [(-1, f"guest-{i}") for i in range(20)]
        events = [ResolvedEvent(kind, u, uid, int(rng.integers(bundle.state.item_n_imp.size)), t)
                  for _ in range(3) for u, uid in users for kind in ("impression", bundle.tasks[0], "like")]
        for lo in range(0, len(events), 50):
            (a if lo % 100 else b).apply(events[lo:lo + 50])
            emb.apply(events[lo:lo + 50])
        for u, uid in users:
            assert _same(user_state(a, bundle, uid, u), user_state(emb, bundle, uid, u)), uid
            assert _same(user_state(b, bundle, uid, u), user_state(emb, bundle, uid, u)), uid
        items = np.unique([e.item for e in events]).astype(np.int32)

        def mirrored(store) -> bool:   # a's batches reach b's mirror through the log, within its tail period
            return all(np.allclose(x, y, rtol=1e-6) for x, y in zip(store.item_stats(items), emb.item_stats(items)))

        wait_for(lambda: mirrored(a) and mirrored(b), timeout=5, what="both mirrors caught up")
        assert not a.fell_back() and not b.fell_back()
        assert a.stats()["buffered"] == b.stats()["buffered"] == 0
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------ faults


def returns_while_down(call, hang_s: float = 30.0):
    """Run `call` on a thread and return its result; it must finish while the node the test
    stopped is still down (the test brings it back only afterwards), so a call that waited
    for the node would never return here. `hang_s` only catches a hang, it times nothing."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", call()), daemon=True)
    t.start()
    t.join(hang_s)
    assert not t.is_alive(), "the call waited for the stopped node"
    return out["r"]

def test_lost_replies_are_applied_once(cluster, bundle):
    """The item shard freezes (SIGSTOP) under a batch: the calls sent to it time out but run
    when it resumes; the store retries them, and each lands exactly once. The batch's part for
    another shard is held back meanwhile (sent after the item shard's part, never without it)."""
    store = RedisStore(bundle, cluster.url())
    meta = cluster.node_of(META)
    here = next(f"guest-{i}" for i in range(1000) if _port_of_user(cluster, f"guest-{i}") == meta.port)
    there = next(f"guest-{i}" for i in range(1000) if _port_of_user(cluster, f"guest-{i}") != meta.port)
    before = int(meta.client().hget(IMP, 11) or 0)
    try:
        user_state(store, bundle, here)                       # a connection to the shard exists: the batch is sent
        meta.pause()
        # returns while the shard is still frozen (it stays so until resumed below): not waiting on it
        returns_while_down(lambda: store.apply([ResolvedEvent("impression", -1, u, 11, store.clock.days())
                                                for u in (here, there, here)]))
        assert store.stats()["buffered"] == 3 and store.stats()["nodes_down"] == 1
        assert user_state(store, bundle, there).seen[0] == -1 and not store.fell_back()   # live shard; the batch
        #                                                     waits for the item shard (nothing sent without it)
        assert user_state(store, bundle, here).n_imp == 0 and store.fell_back()   # frozen shard: bundle state
        time.sleep(0.3)                                                  # several flush attempts time out too
        meta.resume()
        wait_for(lambda: store.stats()["up"] and not store.stats()["buffered"], what="buffer flushed")
        assert int(meta.client().hget(IMP, 11)) == before + 3
        assert [int(x) for x in meta.client().lrange(user_key(here) + "seen", 0, -1)] == [11, 11]
        assert user_state(store, bundle, there).seen[:2].tolist() == [11, -1]
        # Usually a retry finds its call already applied (stats "duplicates"); on a loaded machine the
        # frozen shard may drop the timed-out connection's calls unread instead: either way the
        # counters and lists above hold each event once, which is what this test is for.
    finally:
        meta.resume()
        store.close()


def test_shard_down_fails_open_then_repaired(cluster, bundle, tiny_config):
    """A master that is not the item shard stops: its users are served from the bundle, flagged
    degraded, their events buffered; the other users are served live. It comes back empty: its
    slots are re-seeded from the bundle, the buffer replayed on top, the other shards untouched."""
    cfg = load_config(tiny_config)
    store = RedisStore(bundle, cluster.url())
    engine = Engine(cfg, bundle, store=store)
    meta = cluster.node_of(META)
    victim = next(n for n in cluster.nodes if n is not meta)
    known = [(u, str(uid)) for u, uid in enumerate(bundle.user_ids.tolist()) if bundle.state.user_n_imp[u] > 0]
    down = [(u, uid) for u, uid in known if _port_of_user(cluster, uid) == victim.port][:2]
    live = next((u, uid) for u, uid in known if _port_of_user(cluster, uid) != victim.port)
    items = bundle.item_ids.tolist()
    try:
        live_items = [x for x in engine.recommend(Request(user_id=live[1], count=20)).item_ids if x != "i10"][:3]
        engine.report_events([Event("impression", live[1], x, 0) for x in live_items])
        victim.stop()
        resp = returns_while_down(lambda: engine.recommend(Request(user_id=down[0][1], count=20)))
        assert resp.degraded and len(resp.item_ids) == 20
        assert _same(user_state(store, bundle, down[0][1], down[0][0]),
                     state_user(bundle.state.arrays(), down[0][0], bundle.tables.user_profile[down[0][0]]))
        again = engine.recommend(Request(user_id=live[1], count=20))       # other shards: live, not degraded
        assert not again.degraded and not set(again.item_ids) & set(live_items)
        hidden = [x for x in resp.item_ids if x != "i10"][:3]
        assert engine.report_events([Event("impression", down[0][1], x, 0) for x in hidden]) == (3, [])
        assert store.stats()["buffered"] == 3 and store.stats()["nodes_down"] == 1
        imp = int(meta.client().hget(IMP, items.index(hidden[0])) or 0)   # the item part was not held back

        victim.start()                                                     # rejoins with its slots, empty
        cluster.wait_ok()
        wait_for(lambda: store.stats()["up"] and not store.stats()["buffered"], what="shard repaired and flushed")
        u, uid = down[0]
        seen = user_state(store, bundle, uid, u).seen
        assert seen[:3].tolist() == [items.index(x) for x in reversed(hidden)]       # replayed in order ...
        assert np.array_equal(seen[3:], bundle.state.user_seen[u][:-3])            # ... on the re-seeded state
        v, vid = down[1]
        assert _same(user_state(store, bundle, vid, v), state_user(bundle.state.arrays(), v, bundle.tables.user_profile[v]))
        assert int(meta.client().hget(IMP, items.index(hidden[0]))) == imp          # counted once
        assert user_state(store, bundle, live[1], live[0]).seen[0] == items.index(live_items[-1])   # live state kept
        final = engine.recommend(Request(user_id=uid, count=20))
        assert not final.degraded and not set(final.item_ids) & set(hidden)
    finally:
        if not victim.running():
            victim.start()
        engine.close()


def test_item_shard_restarted_empty_reseeds_everything(cluster, bundle):
    """The shard holding meta:{g}:bundle comes back empty: the store cannot tell which catalog
    the other shards hold any more, so it empties every primary and seeds the whole cluster
    again (as a standalone Redis restarted empty), then replays what it buffered."""
    store = RedisStore(bundle, cluster.url())
    meta = cluster.node_of(META)
    other = next(f"guest-{i}" for i in range(1000) if _port_of_user(cluster, f"guest-{i}") != meta.port)
    try:
        store.apply([ResolvedEvent("impression", -1, other, 3, store.clock.days())])
        meta.stop()
        store.apply([ResolvedEvent("impression", -1, other, 4, store.clock.days())])
        assert store.stats()["buffered"] == 1
        meta.start()
        cluster.wait_ok()
        wait_for(lambda: store.stats()["up"] and not store.stats()["buffered"], what="re-seeded and flushed")
        assert user_state(store, bundle, other).seen[:2].tolist() == [4, -1]   # before the restart: gone with the DB
        assert int(meta.client().hget(IMP, 4)) == int(bundle.state.item_n_imp[4]) + 1
        assert user_slot(other) != META_SLOT
    finally:
        if not meta.running():
            meta.start()
        store.close()
