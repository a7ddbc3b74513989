"""Which nodes the store may use right now, and its counters.

A node that failed (or whose slots do not hold this bundle version) is marked down: its users
are served from the bundle's state and their events buffered, without touching it, until the
background thread (engine.store.redis.recovery) has reached it again. `ready` is False while
the DB as a whole is unusable (unreachable at start, being seeded, taken by a newer bundle).
"""
from __future__ import annotations

import collections
import logging
import threading

from engine.store.redis.keys import META_SLOT
from engine.store.redis.topology import ERRORS, Topology

log = logging.getLogger("recserve.store")


class Counters:
    """Thread-safe event counters for GetStatus and /metrics (`store.*`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class Health:
    def __init__(self, net: Topology):
        self.net = net
        self.ready = False               # meta:{g}:bundle names this version (as last seen)
        self.down: set[str] = set()      # nodes whose users are served from the bundle meanwhile

    def unit(self, slot: int) -> int:
        """The unit (slot) a key of `slot` is written and checked in: the whole standalone DB is slot g's."""
        return slot if self.net.cluster else META_SLOT

    def route(self, unit: int) -> str | None:
        """The node to read `unit` from, or None: answer from the bundle's state."""
        if not self.ready:
            return None
        try:
            node = self.net.node(unit)
        except ERRORS as e:
            self.lost(e)
            return None
        return None if node in self.down else node

    def usable(self, unit: int) -> bool:
        """Whether `unit`'s node may be written to now (the caller also checks its buffer)."""
        if not self.ready:
            return False
        try:
            return self.net.node(unit) not in self.down
        except ERRORS:
            return False

    def lost(self, reason: object, node: str | None = None) -> None:
        """`node` unusable: its users are served from the bundle; None: the whole store is."""
        if node is None:
            if self.ready:
                log.warning("redis feature store unavailable (%s): serving the bundle's state, buffering events",
                            reason)
            self.ready = False
        elif node not in self.down:
            if self.ready:
                log.warning("redis feature store: %s unavailable (%s): serving the bundle's state for its users, "
                            "buffering their events", node, reason)
            self.down.add(node)
