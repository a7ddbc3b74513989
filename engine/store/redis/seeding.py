"""Seeding a Redis DB with a bundle's state, and repairing cluster slots that came back empty.

One server seeds (the CLAIM script elects it and empties the DB); the others wait until
meta:{g}:bundle is published. A bundle over the catalog the DB holds follows the DB's stamp
(engine.store.redis.keys.Stamp), whatever its version: events accepted since the last bundle
survive a model update, and processes started after a hot roll agree with those that rolled
(they kept the stamp) instead of taking the DB from them or refusing it. A cluster shard that
comes back empty is repaired slot by slot, only where the slot's stamp is missing, atomically
with setting it, so a repair never overwrites live state. Details: docs/feature_store.md.
"""
from __future__ import annotations

import logging
import time
import uuid

import numpy as np
from redis.exceptions import RedisError

from engine.core.bundle import Bundle
from engine.store.redis.scripts import CLAIM, RESTAMP, SEED, run_all
from engine.store.redis.health import Health
from engine.store.redis.keys import CATALOG, EPOCH, HOT, IMP, LOCK, META, META_SLOT, POS, Stamp, stamp_key, \
    user_key, user_slot
from engine.store.redis.topology import Topology

log = logging.getLogger("recserve.store")

SEED_CHUNK = 1000           # users per seeding pipeline
SEED_LOCK_MS = 30_000       # the seeder refreshes it per chunk; a crashed seeder's lock expires


class Seeder:
    def __init__(self, net: Topology, health: Health, bundle: Bundle, catalog: str, stamp: Stamp):
        self.net, self.health, self.bundle, self.catalog, self.stamp = net, health, bundle, catalog, stamp
        self.version = bundle.version
        self._users: dict[int, list[int]] | None = None

    def sync(self) -> str:
        """"ready" once meta:{g}:bundle names the stamp, followed if the DB holds this catalog,
        seeding the DB first if it is empty or holds another catalog of an older version;
        "busy" while another server seeds; "newer" if it holds another catalog of a newer version."""
        meta = self.net.client(self.net.node(META_SLOT), slow=True)
        cur, catalog = meta.mget(META, CATALOG)
        if cur is not None and cur != self.stamp.raw and catalog == self.catalog.encode():
            log.info("redis feature store: the DB holds this catalog's state under %s; bundle %s follows it",
                     cur.decode(), self.version)
            self.stamp.set(cur.decode())
            self.health.down |= set(self.net.primaries())   # check (re-stamp) every node's slots
        if cur == self.stamp.raw:
            return "ready"
        if cur is not None and cur > self.version.encode():
            return "newer"
        token = uuid.uuid4().hex
        claimed = run_all(meta, CLAIM, [([META, CATALOG, LOCK],
                                                         [self.version, token, SEED_LOCK_MS, self.catalog])])[0]
        if claimed == 0:
            return "busy"
        self.stamp.set(self.version)   # seeded here, or adopted (the catalog matched after all: a race)
        if claimed == 1:
            self.seed(token)
        self.health.down |= set(self.net.primaries())   # seeded or adopted: check (re-stamp) every node's slots
        return "ready"

    def _users_by_slot(self) -> dict[int, list[int]]:
        """Bundle users with any state (the ones seeding writes), grouped by their slot."""
        if self._users is None:
            st, ids = self.bundle.state, np.asarray(self.bundle.user_ids).tolist()
            users = np.flatnonzero((st.user_n_imp > 0) | (st.user_n_pos > 0) | (st.user_recent[:, 0] >= 0))
            by_slot: dict[int, list[int]] = {}
            for u in users.tolist():
                by_slot.setdefault(user_slot(str(ids[u])), []).append(u)
            self._users = by_slot
        return self._users

    def _seed_slots(self, node: str, slots, repair: bool, lock_token: str | None = None) -> int:
        """Write the bundle's users of `slots` (all on `node`), one script per slot, SEED_CHUNK
        users per pipeline. Seeding (repair=False) writes unconditionally and, on a cluster,
        stamps every slot but g's (meta:{g}:bundle is published last); a repair writes and
        stamps only slots whose stamp is missing. Returns the users written."""
        st, ids = self.bundle.state, np.asarray(self.bundle.user_ids).tolist()
        by_slot, client = self._users_by_slot(), self.net.client(node, slow=True)
        calls: list[tuple[list, list]] = []
        size = written = 0

        def send() -> None:
            run_all(client, SEED, calls)
            if lock_token is not None:
                self.net.client(self.net.node(META_SLOT), slow=True).pexpire(LOCK, SEED_LOCK_MS)
            calls.clear()

        for s in slots:
            mode = 2 if repair else 1 if self.net.cluster and s != META_SLOT else 0
            users = by_slot.get(s, ())
            if not users and not mode:
                continue
            keys, args = [stamp_key(s)], [self.stamp.name, mode]
            for u in users:
                k = user_key(str(ids[u]), s)
                keys += (k + "recent", k + "seen", k + "n")
                for arr in (st.user_recent[u], st.user_seen[u]):
                    v = arr[arr >= 0].tolist()
                    args += (len(v), *v)
                args += (int(st.user_n_imp[u]), int(st.user_n_pos[u]))
            calls.append((keys, args))
            size += len(users) + 1
            written += len(users)
            if size >= SEED_CHUNK:
                send()
                size = 0
        if calls:
            send()
        return written

    def seed(self, token: str) -> None:
        """Empty the other shards (the claim emptied g's), load the bundle's end-of-log state
        node by node, then publish meta:{g}:bundle."""
        t0 = time.monotonic()
        st = self.bundle.state
        meta_node = self.net.node(META_SLOT)
        r = self.net.client(meta_node, slow=True)
        if self.net.cluster:
            for node in self.net.primaries():
                if node != meta_node:
                    self.net.client(node, slow=True).flushdb()
        users = sum(self._seed_slots(node, self.net.slots(node), False, token) for node in self.net.primaries())
        for key, values in ((IMP, st.item_n_imp), (POS, st.item_n_pos), (HOT, st.item_hot)):
            nz = np.flatnonzero(values)
            for lo in range(0, nz.size, 10 * SEED_CHUNK):
                part = nz[lo:lo + 10 * SEED_CHUNK]
                if key == HOT:
                    r.zadd(HOT, dict(zip(part.tolist(), np.asarray(values[part], np.float64).tolist())))
                else:
                    r.hset(key, mapping=dict(zip(part.tolist(), np.asarray(values[part]).astype(np.int64).tolist())))
        if r.get(LOCK) != token.encode():
            raise RedisError("seed lock lost while seeding (took longer than its expiry?)")
        r.pipeline(transaction=True).set(META, self.stamp.name).set(CATALOG, self.catalog).set(EPOCH, token).delete(
            LOCK).execute()   # a new epoch: every mirror reloads
        log.info("redis feature store seeded with bundle %s: %d users, %d items in %.1f s",
                 self.version, users, st.item_n_imp.size, time.monotonic() - t0)

    def repair(self, node: str) -> None:
        """Cluster: every slot of `node` must hold the stamp. A missing stamp (the node came
        back empty) gets the slot's users re-seeded from the bundle; an older one (a DB adopted
        under the stamp: same catalog) is re-stamped; a newer one keeps the node down."""
        if not self.net.cluster:
            return
        slots = [s for s in self.net.slots(node) if s != META_SLOT]
        client = self.net.client(node, slow=True)
        stamps: list = []
        for lo in range(0, len(slots), 4096):
            p = client.pipeline(transaction=False)
            for s in slots[lo:lo + 4096]:
                p.get(stamp_key(s))
            stamps += p.execute()
        own = self.stamp.raw
        if any(v is not None and v > own for v in stamps):
            raise RedisError(f"{node} holds slots of a newer bundle than {self.stamp.name}")
        older = [s for s, v in zip(slots, stamps) if v is not None and v != own]
        if older:
            run_all(client, RESTAMP, [([stamp_key(s)], [self.stamp.name]) for s in older])
        missing = [s for s, v in zip(slots, stamps) if v is None]
        if missing:
            users = self._seed_slots(node, missing, True)
            log.warning("redis feature store: %s had lost %d slots; re-seeded them from bundle %s (%d users)",
                        node, len(missing), self.version, users)
