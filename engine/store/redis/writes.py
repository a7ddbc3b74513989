"""The event path of the Redis store: split a batch per slot, write it, buffer what cannot be.

Each event batch becomes one sub-batch per unit (slot) it touches: one per user slot (those
users' keys) and one for slot g (item counters and one item log entry); each is one APPLY
call, pipelined per node, slot g's node first. Sub-batches are numbered per unit, so the
script applies each exactly once and in order, across lost replies and retries. What cannot
be written now (node down, or earlier sub-batches of its unit still buffered) waits here, in
order, up to `event_buffer` events; the background thread flushes it (`flush`).
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Callable

from redis.exceptions import RedisError

from engine.core.errors import Overloaded
from engine.core.features import ResolvedEvent
from engine.core.state import decay
from engine.store.redis.scripts import APPLY, run
from engine.store.redis.health import Counters, Health
from engine.store.redis.keys import HOT, IMP, LOG, META_SLOT, POS, Stamp, seq_key, stamp_key, user_key, user_slot
from engine.store.redis.topology import ERRORS, Topology

log = logging.getLogger("recserve.store")

FLUSH_CALLS = 64            # buffered sub-batches per flush round trip ...
FLUSH_ARGS = 12_000         # ... and script arguments (~2,000 events): it runs on the 50 ms socket


@dataclass(slots=True)
class _Batch:
    n: int          # events
    left: int = 0   # its sub-batches still buffered


@dataclass(slots=True)
class Entry:
    """The part of one event batch that lands in one unit (slot)."""
    unit: int
    seq: int
    keys: list      # after the stamp and the sequence key
    args: list      # after the head: number of user ops, user ops, item ops
    batch: _Batch

    def item_ops(self) -> list:
        """Its item ops, flat: flags, item, hot weight per event (slot g's entries only)."""
        return self.args[1 + 3 * self.args[0]:]


class _SlotOps:
    """Builds one unit's share of a batch: its users' keys (3 each) and ops."""
    __slots__ = ("keys", "index", "user", "item")

    def __init__(self, with_items: bool):
        self.keys: list[str] = [IMP, POS, HOT, LOG] if with_items else []
        self.index: dict[str, int] = {}
        self.user: list = []
        self.item: list = []

    def add_user(self, flags: int, prefix: str, item: int) -> None:
        k = self.index.get(prefix)
        if k is None:   # KEYS is 1-based and starts with the stamp and the sequence key
            k = self.index[prefix] = len(self.keys) + 3
            self.keys += (prefix + "seen", prefix + "recent", prefix + "n")
        self.user += (flags, k, item)


@dataclass(frozen=True)
class Rules:
    """How events change state: the stamp they are written under, primary task, ring sizes and hot decay."""
    stamp: Stamp
    primary: str
    recent_len: int
    seen_len: int
    t_ref: float
    half_life: float


class Writer:
    def __init__(self, net: Topology, health: Health, counts: Counters, rules: Rules, event_buffer: int,
                 on_ack: Callable[[Entry], None]):
        """`on_ack(entry)`: called (under `lock`) for every sub-batch Redis acknowledged."""
        self.net, self.health, self.counts, self.rules = net, health, counts, rules
        self.writer = uuid.uuid4().hex[:16]   # this process, in its sequence keys and log entries
        self.lock = threading.Lock()          # one write at a time: this process's batches reach Redis in order
        self._on_ack = on_ack
        self._next: dict[int, int] = {}       # unit -> last sub-batch number given out
        self._acked: dict[int, int] = {}      # unit -> last sub-batch number known applied
        self._pending: dict[int, collections.deque[Entry]] = {}   # unit -> buffered, in order
        self.queued, self._cap = 0, event_buffer                  # events with a part buffered

    def acked(self, unit: int) -> int:
        return self._acked.get(unit, 0)

    def pending_nodes(self) -> set[str]:
        with self.lock:
            return {self.net.node(u) for u in self._pending}

    # -- the event path ---------------------------------------------------------------
    def apply(self, events: list[ResolvedEvent]) -> None:
        """Write now the parts of the batch whose node is up and has nothing buffered for their
        slot, buffer the others (in order) for the background thread; a full buffer refuses
        the whole batch with Overloaded before anything is written."""
        r = self.rules
        parts: dict[int, _SlotOps] = {}
        n = 0
        for e in events:
            flags = (e.kind == "impression") | (e.kind == r.primary) << 1
            if not flags:   # other kinds change no feature
                continue
            n += 1
            item, slot = int(e.item), user_slot(e.user_id)
            unit = self.health.unit(slot)
            ops = parts.get(unit) or parts.setdefault(unit, _SlotOps(unit == META_SLOT))
            ops.add_user(flags, user_key(e.user_id, slot), item)
            ops = parts.get(META_SLOT) or parts.setdefault(META_SLOT, _SlotOps(True))
            ops.item += (flags, item, repr(float(decay(e.t, r.t_ref, r.half_life))))
        if not n:
            return
        with self.lock:
            # the item part first: while slot g cannot be written the whole batch waits, so that
            # if its shard comes back empty (every shard re-seeded) nothing acknowledged is lost
            now = [u for u in parts if self._writable(u)] if self._writable(META_SLOT) else []
            if len(now) < len(parts) and self.queued + n > self._cap:
                self.counts.add("rejected", n)
                raise Overloaded(f"feature store: Redis unavailable and {self.queued} events buffered "
                                 f"(serving.event_buffer = {self._cap}); retry later")
            batch = _Batch(n)
            entries = {}
            for u, ops in parts.items():
                seq = self._next[u] = self._next.get(u, 0) + 1
                entries[u] = Entry(u, seq, ops.keys, [len(ops.user) // 3, *ops.user, *ops.item], batch)
            failed = self._write([entries[u] for u in now])   # the reply may be lost, not the write: same seq
            direct = set(now)
            later = [e for u, e in entries.items() if u not in direct] + failed
            for e in later:
                self._pending.setdefault(e.unit, collections.deque()).append(e)
            if later:
                batch.left = len(later)
                self.queued += n
                self.counts.add("buffered_total", n)

    def _writable(self, unit: int) -> bool:
        return unit not in self._pending and self.health.usable(unit)

    def _call(self, e: Entry) -> tuple[list, list]:
        r = self.rules
        return ([stamp_key(e.unit), seq_key(e.unit, self.writer), *e.keys],
                [r.stamp.name, e.seq, self._acked.get(e.unit, 0), r.recent_len, r.seen_len, *e.args])

    def _acknowledged(self, e: Entry) -> None:
        self._acked[e.unit] = e.seq
        self._on_ack(e)

    def _write(self, entries: list[Entry]) -> list[Entry]:
        """Apply sub-batches now, one pipeline per node, the node of slot g first (nothing else
        is sent if its part fails); returns those not known to be applied."""
        by_node: dict[str, list[Entry]] = {}
        failed: list[Entry] = []
        try:
            by_node[self.net.node(META_SLOT)] = []
            for e in entries:
                by_node.setdefault(self.net.node(e.unit), []).append(e)
        except ERRORS as err:
            self.health.lost(err)
            return entries
        items_ok = True
        for node, es in by_node.items():
            if not es:
                continue
            if not items_ok:
                failed += es
                continue
            try:
                res = run(self.net.client(node), APPLY, [self._call(e) for e in es])
            except ERRORS as err:
                self.health.lost(err, node)
                res = [err] * len(es)
            for e, r in zip(es, res):
                if r in (0, 1):
                    self._acknowledged(e)
                else:
                    self.health.lost(self._why(r, e.unit), node)
                    failed.append(e)
                    items_ok = items_ok and e.unit != META_SLOT
        return failed

    def _why(self, r: object, unit: int) -> str:
        if r == -1:
            return f"{stamp_key(unit)} is not {self.rules.stamp.name}"
        if r == -2:
            return f"an earlier event batch for slot {unit} is still missing"
        return str(r)

    # -- the background flush ---------------------------------------------------------
    def flush(self, node: str) -> None:
        """Send the node's buffered sub-batches in order, a bounded pipeline per round trip,
        until none is left; then its users are read from Redis again. Raises when the node
        refuses them (the background thread retries)."""
        flushed = 0
        while True:
            with self.lock:
                units = [u for u in self._pending if self.net.node(u) == node]
                if not units:
                    back = node in self.health.down
                    self.health.down.discard(node)
                    break
                sent, size = [], 0
                for e in itertools.chain.from_iterable(self._pending[u] for u in units):
                    if sent and (len(sent) == FLUSH_CALLS or size + len(e.args) > FLUSH_ARGS):
                        break
                    sent.append(e)
                    size += len(e.args)
                res = run(self.net.client(node), APPLY, [self._call(e) for e in sent])
                blocked: dict[int, object] = {}
                progress = False
                for e, r in zip(sent, res):
                    if e.unit in blocked:
                        continue
                    if r in (0, 1):
                        progress = True
                        if r == 0:
                            self.counts.add("duplicates")   # applied before: its first reply was lost
                        q = self._pending[e.unit]
                        q.popleft()
                        if not q:
                            del self._pending[e.unit]
                        self._acknowledged(e)
                        e.batch.left -= 1
                        if not e.batch.left:
                            self.queued -= e.batch.n
                            flushed += e.batch.n
                    else:
                        blocked[e.unit] = r
                if -1 in blocked.values() or not progress:   # a slot lost its state, or stuck: retry later
                    unit, r = next(((u, r) for u, r in blocked.items() if r == -1), next(iter(blocked.items())))
                    raise RedisError(f"flushing to {node}: {self._why(r, unit)}")
        if flushed or back:
            self.counts.add("retried", flushed)
            log.warning("redis feature store: %s back; %d buffered events flushed", node, flushed)
