"""Reading a sample-log stream with offsets: what the joiner (and anything else offline) uses.

A `LogReader` reads one stream (impressions, events) from where a cursor stands and returns
the record batches after it, each with its position, and the cursor after them. A cursor is a
JSON-able dict: partition -> position. Files: one partition per segment, its position a byte
offset, DONE once the segment is closed and read to its end (names of deleted segments drop
out); [offset, [positions of raw records not covered yet]] while the writer's covering round
is pending (engine.store.samplelog.covering). Redis: one partition, the stream key, its
position the last entry id read. A consumer
that stores the cursor with what it derived from the batches resumes exactly after them.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from engine.store.samplelog import records
from engine.store.samplelog.covering import split_cover
from engine.store.samplelog.raw import raw_batch
from engine.store.samplelog.segments import BATCH, COVER, RAW, SUFFIX, SegmentFile, locked

log = logging.getLogger("recserve.samplelog")

DONE = -1
FETCH_OPEN = 8           # segments `fetch` keeps open (the joiner re-reads in about log order)
Cursor = dict[str, Any]


@dataclass(frozen=True)
class Chunk:
    partition: str
    start: Any             # where the record is: a byte offset or a stream entry id (for `fetch`)
    batch: pa.RecordBatch


@dataclass
class ReadStats:
    torn_bytes: int = 0          # bytes after the last whole record of a closed segment, skipped
    torn_segments: int = 0
    lost_partitions: int = 0     # a partition the cursor was inside of, gone (retention, trim)
    uncovered: int = 0           # raw records a dead writer left without their Arrow batch, converted here


class LogReader(Protocol):
    stream: str
    stats: ReadStats

    def poll(self, cursor: Cursor, max_bytes: int = 64 << 20) -> tuple[list[Chunk], Cursor, bool]:
        """Batches after `cursor`, the cursor after them, and whether this read reached the end
        of what is written (False: call again for more)."""

    def fetch(self, partition: str, start: Any) -> pa.RecordBatch:
        """The batch a chunk carried, read again by its position."""

    def close(self) -> None: ...


class SegmentLog:
    """The segments of one stream in a log folder (`<dir>/<stream>/*.seg`)."""

    def __init__(self, directory: str | Path, stream: str):
        self.dir, self.stream = Path(directory) / stream, stream
        self.schema = records.SCHEMAS[stream]
        self.stats = ReadStats()
        self._open: dict[str, SegmentFile] = {}             # segments being read
        self._fetched: OrderedDict[str, SegmentFile] = OrderedDict()   # segments read again (fetch)

    def _file(self, name: str) -> SegmentFile:
        f = self._open.get(name)
        if f is None:
            f = self._open[name] = SegmentFile(self.dir / name)
        return f

    def _forget(self, name: str) -> None:
        f = self._open.pop(name, None)
        if f is not None:
            f.close()

    def poll(self, cursor: Cursor, max_bytes: int = 64 << 20) -> tuple[list[Chunk], Cursor, bool]:
        names = sorted(p.name for p in self.dir.glob(f"*{SUFFIX}")) if self.dir.is_dir() else []
        present = set(names)
        out = {k: v for k, v in cursor.items() if k in present}
        for name, pos in cursor.items():
            if name not in present and pos != DONE:
                self.stats.lost_partitions += 1
                log.error("%s/%s: deleted before it was read to its end (at byte %s): its rest is lost",
                          self.stream, name, pos)
                self._forget(name)
        chunks: list[Chunk] = []
        budget, at_end = max_bytes, True
        for name in names:
            at = out.get(name, 0)
            if at == DONE:
                continue
            if budget <= 0:
                at_end = False
                break
            pos, uncovered = (at[0], list(at[1])) if isinstance(at, list) else (at, [])
            live = locked(self.dir / name)       # before reading: a record written after this is read next time
            try:
                f = self._file(name)
            except (ValueError, FileNotFoundError) as e:
                if live:
                    continue                     # just created: its header is being written
                log.error("%s: %s; skipped", self.stream, e)
                out[name] = DONE
                continue
            recs, stop, rest = f.records(pos, budget)
            for r in recs:
                if r.kind == BATCH:
                    chunks.append(Chunk(name, r.start, records.decode(r.payload, f.schema)))
                elif r.kind == RAW:              # covered by a later COVER, in order
                    uncovered.append(r.start)
                elif r.kind == COVER:
                    count, ipc = split_cover(r.payload)
                    del uncovered[:count]
                    chunks.append(Chunk(name, r.start, records.decode(ipc, f.schema)))
                budget -= r.end - r.start
            out[name] = [stop, uncovered] if uncovered else stop
            if rest < 0:
                at_end = False                   # stopped at the byte budget, more is there
            elif not live:
                if rest:
                    self.stats.torn_bytes += rest
                    self.stats.torn_segments += 1
                    log.warning("%s/%s: skipped a torn tail of %d bytes at byte %d (its writer died "
                                "mid-append, before acknowledging it)", self.stream, name, rest, stop)
                for start in uncovered:          # its writer died before covering them: converted here
                    chunks.append(Chunk(name, start, raw_batch([f.record_at(start).payload])))
                self.stats.uncovered += len(uncovered)
                out[name] = DONE
                self._forget(name)
        return chunks, out, at_end

    def fetch(self, partition: str, start: Any) -> pa.RecordBatch:
        f = self._open.get(partition)
        if f is None:                      # a segment poll is done with: a few kept open, oldest closed
            f = self._fetched.pop(partition, None) or SegmentFile(self.dir / partition)
            self._fetched[partition] = f
            if len(self._fetched) > FETCH_OPEN:
                self._fetched.popitem(last=False)[1].close()
        rec = f.record_at(int(start))
        if rec.kind == COVER:
            return records.decode(split_cover(rec.payload)[1], f.schema)
        if rec.kind == RAW:                # a raw record a dead writer left uncovered
            return raw_batch([rec.payload])
        return records.decode(rec.payload, f.schema)

    def close(self) -> None:
        for name in list(self._open):
            self._forget(name)
        for f in self._fetched.values():
            f.close()
        self._fetched.clear()
