"""RedisStore: the FeatureStore on a Redis or a Redis Cluster, composed of its parts.

Topology (which node holds a slot), Health (which nodes are usable), Writer (the event path
and its buffer), ItemMirror (local item counters), Reader (the request path), Seeder (seed and
repair) and Recovery (the background thread). Design, guarantees and numbers:
docs/feature_store.md.
"""
from __future__ import annotations

import numpy as np

from engine.core.bundle import Bundle
from engine.core.context import UserFeatures
from engine.core.features import BundleClock, ResolvedEvent
from engine.store.common import catalog_id
from engine.store.redis.health import Counters, Health
from engine.store.redis.keys import Stamp, slot_tags
from engine.store.redis.mirror import ItemMirror
from engine.store.redis.reads import Reader
from engine.store.redis.recovery import Recovery
from engine.store.redis.seeding import Seeder
from engine.store.redis.topology import connect
from engine.store.redis.writes import Rules, Writer


class RedisStore:
    name = "redis"

    def __init__(self, bundle: Bundle, url: str, event_buffer: int = 100_000):
        st = bundle.state
        self.version = bundle.version
        self.clock = BundleClock(bundle.manifest)
        stamp = Stamp(bundle.version)   # the DB's, once it follows a DB over this catalog (Seeder.sync)
        rules = Rules(stamp, bundle.tasks[0], st.user_recent.shape[1], st.user_seen.shape[1],
                      float(st.t_ref), float(bundle.manifest["state"]["half_life_days"]))
        slot_tags()   # the table, built once before the first request needs it
        self.net = connect(url)
        self.health = Health(self.net)
        self.counts = Counters()
        self.writes = Writer(self.net, self.health, self.counts, rules, event_buffer,
                             on_ack=lambda e: self.mirror.own(e))
        self.mirror = ItemMirror(self.net, self.health, self.counts, stamp, int(st.item_n_imp.size),
                                 self.writes)
        self.reads = Reader(self.net, self.health, self.counts, self.mirror, rules, st.arrays(),
                            lambda: self.clock.days())
        self.seeder = Seeder(self.net, self.health, bundle, catalog_id(bundle), stamp)
        self.recovery = Recovery(self.net, self.health, self.seeder, self.mirror, self.writes)
        self.recovery.start()

    def user(self, user_id: str, index: int, default_profile: np.ndarray,
             profiles: np.ndarray) -> UserFeatures:
        return self.reads.user(user_id, index, default_profile, profiles)

    def item_stats(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.reads.item_stats(items)

    def hot_top(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.reads.hot_top(n)

    def fell_back(self) -> bool:
        return self.reads.fell_back()

    def apply(self, events: list[ResolvedEvent]) -> None:
        self.writes.apply(events)

    def stats(self) -> dict[str, int]:
        h = self.health
        out = {**self.counts.snapshot(), "up": int(h.ready and not h.down), "buffered": self.writes.queued,
               "dropped": 0, "mirror_lag_ms": self.mirror.lag_ms()}
        if self.net.cluster:
            out["nodes_down"] = len(h.down)
        return out

    def close(self, flush_s: float = 2.0) -> None:
        """Stop the background thread after a last chance to flush buffered events."""
        self.recovery.close(flush_s)
        self.net.close()
