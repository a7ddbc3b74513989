"""The Redis store's background thread: reconnect, re-seed or repair, flush, keep the mirror.

The request path never waits for any of this: it serves the bundle's state for what is
down and buffers events. Every RETRY_S this thread re-reads the slot map, makes sure the DB
holds this bundle version (seeding it if it came back empty), then node by node repairs
slots that came back empty and flushes the buffered events in order; and tails the item log.
"""
from __future__ import annotations

import logging
import threading
import time

from engine.store.redis.health import Health
from engine.store.redis.keys import META_SLOT
from engine.store.redis.mirror import ItemMirror
from engine.store.redis.seeding import Seeder
from engine.store.redis.topology import ERRORS, Topology
from engine.store.redis.writes import Writer

log = logging.getLogger("recserve.store")

RETRY_S = 0.2               # background reconnect / flush period
SEED_WAIT_S = 120.0         # start-up waits this long for another server's seeding


class Recovery:
    def __init__(self, net: Topology, health: Health, seeder: Seeder, mirror: ItemMirror, writes: Writer):
        self.net, self.health, self.seeder, self.mirror, self.writes = net, health, seeder, mirror, writes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="store-redis", daemon=True)

    def start(self) -> None:
        """Wait (bounded) until the DB holds this version, then run the background thread."""
        self._wait_seeded()
        self._thread.start()

    def _wait_seeded(self) -> None:
        h = self.health
        end = time.monotonic() + SEED_WAIT_S
        try:
            self.net.refresh()
            while (state := self.seeder.sync()) == "busy" and time.monotonic() < end:
                time.sleep(RETRY_S)
        except ERRORS as e:
            log.warning("redis feature store unreachable at start (%s): serving the bundle's state until it is", e)
            return
        if state != "ready":
            log.warning("redis feature store: DB is %s; serving the bundle's state meanwhile",
                        "being seeded by another server" if state == "busy" else "seeded by a newer bundle")
            return
        h.down = set(self.net.primaries())
        h.ready = True
        self.mirror.sync()
        for node in self.net.primaries():
            try:
                self.seeder.repair(node)
                h.down.discard(node)
            except ERRORS as e:
                h.lost(e, node)

    def _loop(self) -> None:
        while not self._stop.wait(RETRY_S):
            if not self.health.ready or self.health.down or self.writes.queued:
                try:
                    self.recover()
                except ERRORS as e:
                    self.health.lost(e)
                except Exception:   # noqa: BLE001 - the thread must outlive any bug, the buffer keeps the events
                    log.exception("redis feature store: recovery failed")
            self.mirror.sync()

    def recover(self) -> None:
        """Make sure the DB holds this version (seed it if it came back empty), then, node by
        node: repair its slots if they came back empty, flush its buffered sub-batches in
        order, serve its users from Redis again."""
        h = self.health
        self.net.refresh()
        meta = self.net.node(META_SLOT)
        try:
            state = self.seeder.sync()
        except ERRORS as e:
            # nothing is flushed while the g shard is unreachable: if it comes back empty, every
            # shard is emptied and re-seeded, and what was buffered meanwhile is replayed on top
            h.lost(e, meta)
            return
        if state != "ready":
            h.ready = False
            return
        self.mirror.sync()   # (re)loaded before the flush: a re-seeded DB is mirrored before "up"
        primaries = self.net.primaries()
        if not h.ready:
            h.down |= set(primaries)
            h.ready = True
        pending = self.writes.pending_nodes()
        h.down &= set(primaries)
        for node in primaries:
            if node not in h.down and node not in pending:
                continue
            try:
                self.net.client(node).ping()
                self.seeder.repair(node)
                self.writes.flush(node)
            except ERRORS as e:
                h.lost(e, node)

    def close(self, flush_s: float) -> None:
        """Stop the background thread after a last chance to flush buffered events."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        end = time.monotonic() + flush_s
        while self.writes.queued and time.monotonic() < end:
            try:
                self.recover()
            except ERRORS:
                pass
            if self.writes.queued:
                time.sleep(RETRY_S)
        if self.writes.queued:
            log.error("redis feature store closed with %d events still buffered (Redis unreachable): "
                      "they are lost", self.writes.queued)
