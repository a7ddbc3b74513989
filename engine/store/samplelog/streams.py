"""Redis Streams: the distributed backend of the sample log (same records as the segments).

Every server process XADDs one entry per Recommend (the served list's raw record,
engine.store.samplelog.raw, in field `r`: readers turn it into the same Arrow rows) to
`<prefix>:impressions` and one per ReportEvents (an Arrow IPC batch in field `b`) to
`<prefix>:events`, before it answers. Streams are bounded by length: `XADD ... MAXLEN ~ N` lets Redis drop whole
macro-nodes of the oldest entries once a stream holds about N, so N must cover the joiner's
worst lag (at 100 Recommend/s, N = 1M is ~2.8 hours); entries trimmed before the joiner read
them are lost, detected and counted (ReadStats.lost_partitions) by the reader.

Readers consume through a consumer group (`XREADGROUP`, default group `joiner`): Redis keeps
per group what was delivered and not acknowledged (XPENDING, XINFO GROUPS shows the lag), other
groups read the same streams independently. The reader's cursor (the last entry id it
returned) is the truth for exactly-once: at start the group is moved back to it (XGROUP
SETID), so entries delivered but not committed downstream are delivered again; `ack` marks
them done once the consumer committed them.

While Redis is unreachable, a writer keeps up to `buffer` entries in memory and a background
thread re-sends them in order (they survive a Redis restart, not a kill of the server process
meanwhile); past that the oldest are dropped and counted. Records that reached Redis survive
its restart as far as its persistence does (AOF with appendfsync always: all of them).
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa

from engine.store.samplelog import records
from engine.store.samplelog.raw import raw_batch
from engine.store.samplelog.source import Chunk, Cursor, ReadStats

log = logging.getLogger("recserve.samplelog")

FIELD, RAW_FIELD = b"b", b"r"          # an Arrow IPC record batch, or a raw record
DEFAULT_PREFIX = "recserve:log"
RETRY_S = 0.5


def _client(url: str):
    import redis

    return redis.Redis.from_url(url.split("?", 1)[0], socket_timeout=2.0, socket_connect_timeout=2.0)


def stream_key(url: str, stream: str) -> str:
    """`<prefix>:<stream>`; the prefix from `?prefix=` on the URL (several deployments, one Redis)."""
    prefix = parse_qs(urlsplit(url).query).get("prefix", [DEFAULT_PREFIX])[0]
    return f"{prefix}:{stream}"


class StreamWriter:
    """One stream's appender; thread-safe (redis-py's pool)."""

    def __init__(self, url: str, stream: str, maxlen: int, buffer: int = 10_000, raw: bool = False):
        self.key, self.maxlen, self.field = stream_key(url, stream), maxlen, RAW_FIELD if raw else FIELD
        self.r = _client(url)
        self.pending: collections.deque[bytes] = collections.deque()
        self.buffer = buffer
        self.appended = self.buffered = self.dropped = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._retry_loop, name="samplelog-redis", daemon=True)
        self._thread.start()

    def append(self, payload: bytes) -> str | None:
        """XADD now; the entry id, or None when it went to the retry buffer (Redis unreachable,
        or older entries still waiting: the stream keeps the order they were served in)."""
        import redis

        with self._lock:
            if not self.pending:
                try:
                    entry = self.r.xadd(self.key, {self.field: payload}, maxlen=self.maxlen, approximate=True)
                    self.appended += 1
                    return entry.decode()
                except redis.RedisError as e:
                    log.warning("sample log: XADD to %s failed (%s); buffering", self.key, e)
            if len(self.pending) >= self.buffer:
                self.pending.popleft()
                self.dropped += 1
            self.pending.append(payload)
            self.buffered += 1
            self._wake.set()
            return None

    def _retry_loop(self) -> None:
        import redis

        while not self._stop.is_set():
            self._wake.wait(RETRY_S)
            with self._lock:
                while self.pending:
                    try:
                        self.r.xadd(self.key, {self.field: self.pending[0]}, maxlen=self.maxlen, approximate=True)
                    except redis.RedisError:
                        break
                    self.pending.popleft()
                    self.appended += 1
                if not self.pending:
                    self._wake.clear()
            if self.pending:
                self._stop.wait(RETRY_S)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        self.r.close()


def _id(entry: str | bytes) -> tuple[int, int]:
    s = entry.decode() if isinstance(entry, bytes) else entry
    ms, _, seq = s.partition("-")
    return int(ms), int(seq or 0)


class StreamLog:
    """A stream read through a consumer group, from a cursor (see the module docstring)."""

    def __init__(self, url: str, stream: str, group: str = "joiner", consumer: str = "joiner-1",
                 count: int = 512):
        self.key, self.stream, self.group, self.consumer, self.count = stream_key(url, stream), stream, group, \
            consumer, count
        self.schema = records.SCHEMAS[stream]
        self.r = _client(url)
        self.stats = ReadStats()
        self._placed: str | None = None       # where the group was moved to
        self._delivered: list[str] = []

    def _place(self, at: str) -> None:
        import redis

        try:
            self.r.xgroup_create(self.key, self.group, id=at, mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
            self.r.xgroup_setid(self.key, self.group, id=at)
        self._placed = at

    def _check_trim(self, at: str) -> None:
        """Entries after the cursor deleted by MAXLEN before they were read: lost."""
        if at == "0-0":
            return
        info = self.r.xinfo_stream(self.key)
        deleted = info.get("max-deleted-entry-id")
        if deleted and _id(deleted) > _id(at):
            self.stats.lost_partitions += 1
            log.error("%s: entries after %s were trimmed (MAXLEN) before they were read; up to %s lost",
                      self.key, at, deleted.decode() if isinstance(deleted, bytes) else deleted)

    def poll(self, cursor: Cursor, max_bytes: int = 64 << 20) -> tuple[list[Chunk], Cursor, bool]:
        at = str(cursor.get(self.key, "0-0"))
        if self._placed != at:
            self._place(at)
            self._check_trim(at)
        chunks: list[Chunk] = []
        got, size = 0, 0
        while size < max_bytes:
            reply = self.r.xreadgroup(self.group, self.consumer, {self.key: ">"}, count=self.count)
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                eid = entry_id.decode()
                chunks.append(Chunk(self.key, eid, self._batch(fields)))
                self._delivered.append(eid)
                size += sum(len(v) for v in fields.values())
            got = len(entries)
            if got < self.count:
                break
        new = dict(cursor)
        if chunks:
            new[self.key] = chunks[-1].start
            self._placed = chunks[-1].start
        return chunks, new, got < self.count

    def ack(self, cursor: Cursor) -> None:
        """Acknowledge (XACK) every delivered entry up to the committed cursor."""
        upto = cursor.get(self.key)
        if upto is None:
            return
        done = [e for e in self._delivered if _id(e) <= _id(upto)]
        if done:
            self.r.xack(self.key, self.group, *done)
            self._delivered = [e for e in self._delivered if _id(e) > _id(upto)]

    def fetch(self, partition: str, start: Any) -> pa.RecordBatch:
        got = self.r.xrange(partition, min=start, max=start, count=1)
        if not got:
            raise KeyError(f"{partition}: entry {start} is gone (trimmed)")
        return self._batch(got[0][1])

    def _batch(self, fields: dict) -> pa.RecordBatch:
        raw = fields.get(RAW_FIELD)
        return raw_batch([raw]) if raw is not None else records.decode(fields[FIELD], self.schema)

    def close(self) -> None:
        self.r.close()
