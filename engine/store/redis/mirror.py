"""The item mirror: this process's copy of the item counters, so item reads cost no round trip.

Loaded in chunks, each read atomically with the item log's position, then the log replayed
over the chunks read before each entry: exact without blocking Redis for the whole catalog.
Kept current by tailing item:{g}:log (other writers' deltas) and by this process's own
acknowledged writes (read-your-writes). Reloaded in full when the DB was re-seeded or the log
was trimmed past what it read. Design and numbers: docs/feature_store.md, "Item mirror".
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
import redis
from redis.exceptions import RedisError

from engine.store.redis.health import Counters, Health
from engine.store.redis.keys import EPOCH, HOT, IMP, LOG, META, META_SLOT, POS, Stamp, seq_key
from engine.store.redis.topology import ERRORS, Topology
from engine.store.redis.writes import Entry, Writer

log = logging.getLogger("recserve.store")

MIRROR_CHUNK = 4096         # items per atomic read (MULTI) of a full mirror load
TAIL_COUNT = 1000           # log entries per XREAD / XRANGE
MIRROR_STALE_S = 5.0        # a mirror not synced for longer serves on, but flags its reads


def _numbers(values: list) -> np.ndarray:
    """HMGET / ZMSCORE replies (bytes, float or None) -> float64, missing = 0."""
    return np.fromiter((0.0 if v is None else float(v) for v in values), np.float64, len(values))


def _sid(raw) -> tuple[int, int]:
    """Stream entry id (b"<ms>-<seq>") -> (ms, seq); none -> (0, 0), before every entry."""
    if not raw:
        return (0, 0)
    ms, _, seq = (raw.decode() if isinstance(raw, bytes) else raw).partition("-")
    return int(ms), int(seq or 0)


def _sids(ids: tuple[int, int]) -> str:
    return f"{ids[0]}-{ids[1]}"


def _log_info(info) -> tuple[tuple[int, int], int, int]:
    """XINFO STREAM of the item log (or its error: no log yet) -> last id, entries ever added,
    entries trimmed away (MAXLEN; entries are never deleted otherwise). Redis >= 7.0."""
    if isinstance(info, Exception):
        if "no such key" in str(info).lower():
            return (0, 0), 0, 0
        raise info
    added = int(info["entries-added"])
    return _sid(info["last-generated-id"]), added, added - int(info["length"])


def _split(fields: list[bytes], dtype) -> np.ndarray:
    """Space-joined numbers of several log entries -> one array."""
    return np.array(b" ".join(fields).split()).astype(dtype)


class Counts:
    """The item counters: imp, pos (float32) and hot (float64, the undecayed sum as in
    item:{g}:hot), indexed by item; as of log entry `last` of `epoch`."""
    __slots__ = ("imp", "pos", "hot", "epoch", "last", "added")

    def __init__(self, n: int, epoch: bytes | None):
        self.imp, self.pos = np.zeros(n, np.float32), np.zeros(n, np.float32)
        self.hot = np.zeros(n, np.float64)
        self.epoch, self.last, self.added = epoch, (0, 0), 0   # added: log entries up to `last`

    def add(self, imp: np.ndarray, pos: np.ndarray, hot: np.ndarray) -> None:
        np.add.at(self.imp, imp, 1)
        np.add.at(self.pos, pos, 1)
        np.add.at(self.hot, pos, hot)


class ItemMirror:
    def __init__(self, net: Topology, health: Health, counts: Counters, stamp: Stamp, n_items: int,
                 writes: Writer):
        self.net, self.health, self.counts, self.writes = net, health, counts, writes
        self.stamp, self.n_items = stamp, n_items
        self.current: Counts | None = None     # None: item reads come from the bundle (flagged)
        self._lock = threading.Lock()          # in-place updates: own acknowledged writes vs the tail
        self._own = 0                          # last own item sub-batch (slot g) reflected in `current`
        self._synced = 0.0                     # monotonic time it was last known current
        self._own_key = seq_key(META_SLOT, writes.writer).encode()   # field 'w' of own log entries

    def stale(self) -> bool:
        return time.monotonic() - self._synced > MIRROR_STALE_S

    def lag_ms(self) -> int:
        """Milliseconds since it was last in sync; -1: not loaded."""
        return int((time.monotonic() - self._synced) * 1e3) if self.current is not None else -1

    def sync(self) -> None:
        """Background: load the mirror if there is none, else tail the log. Errors leave the
        mirror as it is (serving its last state; stats: mirror_lag_ms)."""
        try:
            if self.current is None:
                self.load()
            else:
                self.tail()
        except ERRORS as e:
            self.counts.add("mirror_errors")
            log.debug("redis feature store: item mirror not synced (%s)", e)
        except Exception:   # noqa: BLE001 - the thread must outlive any bug
            log.exception("redis feature store: item mirror sync failed")

    def _drop(self, why: str, node: str) -> None:
        """The DB does not hold this version (any more): item reads from the bundle, flagged,
        and the node is marked down so that the background thread re-seeds or waits for it."""
        if self.current is not None:
            log.warning("redis feature store: item mirror dropped (%s)", why)
        self.current = None
        self.health.lost(why, node)

    def tail(self) -> None:
        """Apply the log entries after the mirror's last one, other writers' only (this
        process's were applied when acknowledged). Reload in full if the DB was re-seeded
        (epoch), entries it had not read were trimmed away, or META names another version."""
        node = self.net.node(META_SLOT)
        client = self.net.client(node, slow=True)
        m = self.current
        while m is not None:
            p = client.pipeline(transaction=True)
            p.get(META).get(EPOCH).xinfo_stream(LOG).xread({LOG: _sids(m.last)}, count=TAIL_COUNT)
            meta, epoch, info, got = p.execute(raise_on_error=False)
            for x in (meta, epoch, got):
                if isinstance(x, Exception):
                    raise x
            if meta != self.stamp.raw:
                self._drop(f"{META} is {meta!r}, not {self.stamp.name}", node)
                return
            if epoch != m.epoch:
                self.counts.add("mirror_reloads")
                log.warning("redis feature store: DB re-seeded; reloading the item mirror")
                self.current = None   # the old counters are void: bundle state until reloaded
                self.load()
                return
            _, _, trimmed = _log_info(info)
            if trimmed > m.added:
                self.counts.add("mirror_reloads")
                log.warning("redis feature store: item mirror fell behind the log (trimmed); reloading")
                self.load()
                return
            entries = got[0][1] if got else []
            others = [f for _, f in entries if f.get(b"w") != self._own_key]
            if others:
                imp, pos = _split([f[b"i"] for f in others], np.int64), _split([f[b"p"] for f in others], np.int64)
                hot = _split([f[b"h"] for f in others], np.float64)
                with self._lock:
                    m.add(imp, pos, hot)
            if entries:
                m.last, m.added = _sid(entries[-1][0]), m.added + len(entries)
            self._synced = time.monotonic()
            if len(entries) < TAIL_COUNT:
                return

    def load(self) -> bool:
        """Read every item's counters in chunks, each chunk atomically (MULTI) with the id of
        the log's last entry at that moment; then replay the log entries after the oldest of
        those ids, each only onto the chunks read before it. Exact without blocking Redis for
        the whole catalog. The replay's last page runs under the write lock, atomically with
        this process's sequence key, so its own writes are counted once."""
        node = self.net.node(META_SLOT)
        client = self.net.client(node, slow=True)
        meta, epoch = client.pipeline(transaction=False).get(META).get(EPOCH).execute()
        if meta != self.stamp.raw:
            self._drop(f"{META} is {meta!r}, not {self.stamp.name}", node)
            return False
        t0, n = time.monotonic(), self.n_items
        m = Counts(n, epoch)
        read = np.zeros((-(-n // MIRROR_CHUNK), 3), np.int64)   # per chunk: log id it was read at, entries
        for c, lo in enumerate(range(0, n, MIRROR_CHUNK)):
            hi = min(n, lo + MIRROR_CHUNK)
            f = list(range(lo, hi))
            p = client.pipeline(transaction=True)
            p.get(META).get(EPOCH).hmget(IMP, f).hmget(POS, f).zmscore(HOT, f).xinfo_stream(LOG)
            meta, ep, imp, pos, hot, info = p.execute(raise_on_error=False)
            for x in (meta, ep, imp, pos, hot):
                if isinstance(x, Exception):
                    raise x
            if meta != self.stamp.raw or ep != epoch:
                return False
            m.imp[lo:hi], m.pos[lo:hi], m.hot[lo:hi] = _numbers(imp), _numbers(pos), _numbers(hot)
            last, added, _ = _log_info(info)
            read[c] = (*last, added)
        first = read[np.lexsort((read[:, 1], read[:, 0]))[0]].tolist()
        base, base_added = (first[0], first[1]), first[2]
        cursor, added = base, base_added

        def replay(c: redis.Redis) -> tuple[bool, object]:
            """One page of log entries after `cursor` onto the chunks read before each; whether
            the log's end was reached, and this process's sequence key read with it."""
            nonlocal cursor, added
            p = c.pipeline(transaction=True)
            p.get(META).get(EPOCH).get(self._own_key).xinfo_stream(LOG)
            p.xrange(LOG, min=f"({_sids(cursor)}", max="+", count=TAIL_COUNT)
            meta, ep, own, info, entries = p.execute(raise_on_error=False)
            for x in (meta, ep, own, entries):
                if isinstance(x, Exception):
                    raise x
            if meta != self.stamp.raw or ep != epoch:
                raise RedisError("the DB was re-seeded or taken over while the mirror was loading")
            if _log_info(info)[2] > base_added:
                raise RedisError("item log trimmed while the mirror was loading")
            for eid, fields in entries:
                e = np.array(_sid(eid))
                later = (read[:, 0] < e[0]) | ((read[:, 0] == e[0]) & (read[:, 1] < e[1]))  # chunks before it
                imp, pos = _split([fields[b"i"]], np.int64), _split([fields[b"p"]], np.int64)
                hot = _split([fields[b"h"]], np.float64)
                keep = later[pos // MIRROR_CHUNK]
                m.add(imp[later[imp // MIRROR_CHUNK]], pos[keep], hot[keep])
            if entries:
                cursor, added = _sid(entries[-1][0]), added + len(entries)
            return len(entries) < TAIL_COUNT, own

        while not replay(client)[0]:   # catch up without holding the event path
            pass
        with self.writes.lock:   # the last page: atomically with this process's sequence key, on the 50 ms
            done, own = replay(self.net.client(node))   # client (the event path waits on this lock)
            if not done:
                raise RedisError("item log growing faster than the mirror loads it; retrying")
            m.last, m.added = cursor, added
            with self._lock:
                self._own = max(int(own or 0), self.writes.acked(META_SLOT))
                self.current = m
            self._synced = time.monotonic()
        self.counts.add("mirror_loads")
        log.info("redis feature store: item mirror loaded (%d items, %.0f ms)", n, (time.monotonic() - t0) * 1e3)
        return True

    def own(self, e: Entry) -> None:
        """An acknowledged sub-batch of this process for slot g: its item ops, into the mirror
        now (read-your-writes), unless the mirror already holds it (loaded after it landed)."""
        if e.unit != META_SLOT or e.seq <= self._own:
            return
        ops = e.item_ops()
        flags, items = np.array(ops[0::3], np.int64), np.array(ops[1::3], np.int64)
        pos = flags >= 2
        with self._lock:
            self._own = e.seq
            if self.current is not None:
                self.current.add(items[flags % 2 == 1], items[pos],
                                 np.array([float(w) for w in ops[2::3]], np.float64)[pos])
