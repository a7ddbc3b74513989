"""Rolling segment files: the embedded backend of the sample log, and the joiner's output.

A segment is one writer's append-only file: 8 bytes of magic, then framed records
`<length u32, crc32 u32, type u8> payload` (crc32 over type and payload). The first record is
the Arrow schema (type SCHEMA), then Arrow IPC record batches (BATCH); the impressions stream
writes raw records (RAW) and Arrow batches covering them (COVER, engine.store.samplelog.covering);
the joiner's output adds commit markers (COMMIT, JSON). A record's position is its byte offset.

Durability: `append` returns once the record is written to the kernel (os.write), so the
caller may acknowledge: the record survives a SIGKILL of the process. A background thread
fsyncs every `fsync_s`, and a rotated segment is fsync'd when closed, so power loss costs at
most the last `fsync_s` seconds of records (0: fsync before every append returns). With that
thread, rotation only swaps files under the lock: closing the old segment (fsync, unlock) and
making the new one's name durable (fsync of the folder) are the thread's next pass, so an
append on the request path never waits for a disk flush it did not ask for.

Liveness: the writer holds an exclusive flock on its open segment. A reader at the end of a
locked segment waits for more; at the end of an unlocked one it knows the segment is closed,
and bytes that do not form a whole record there are a torn tail (the writer was killed
mid-append, before the record was acknowledged): skipped and counted, never read as data.
"""
from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from engine.store.eventlog import fsync_dir

log = logging.getLogger("recserve.samplelog")

MAGIC = b"RSSEG\x00\x01\n"
_HEAD = struct.Struct("<IIB")        # payload length, crc32(type + payload), type
SCHEMA, BATCH, COMMIT, RAW, COVER = 1, 2, 3, 4, 5   # RAW, COVER: engine.store.samplelog.covering
MAX_RECORD = 1 << 30
SUFFIX = ".seg"


def frame(kind: int, payload: bytes) -> bytes:
    return _HEAD.pack(len(payload), zlib.crc32(payload, zlib.crc32(bytes((kind,)))), kind) + payload


@dataclass(frozen=True)
class Record:
    kind: int           # SCHEMA | BATCH | COMMIT
    start: int          # byte offset of the record's frame
    end: int            # byte offset after it: where the next record starts
    payload: bytes


def parse(data: bytes | memoryview, pos: int) -> Record | None:
    """The whole record at `pos` of `data`, or None if the bytes there do not form one (cut
    short, or failing the checksum)."""
    if pos + _HEAD.size > len(data):
        return None
    n, crc, kind = _HEAD.unpack_from(data, pos)
    end = pos + _HEAD.size + n
    if n > MAX_RECORD or end > len(data):
        return None
    body = bytes(data[pos + _HEAD.size:end])
    if zlib.crc32(body, zlib.crc32(bytes((kind,)))) != crc:
        return None
    return Record(kind, pos, end, body)


def locked(path: Path) -> bool:
    """Whether a live writer holds the segment (flock is per open file: works in one process too)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class SegmentWriter:
    """One process's appender to `directory`; rotates by size and age; thread-safe."""

    def __init__(self, directory: str | Path, schema: pa.Schema, *, segment_bytes: int = 64 << 20,
                 segment_s: float = 300.0, fsync_s: float = 1.0, retain_s: float = 0.0, retain_bytes: int = 0,
                 name_tag: str = ""):
        """`retain_s` / `retain_bytes` (0: unbounded): at each rotation, closed segments older
        than retain_s, then the oldest while the folder holds more than retain_bytes, are
        deleted, whoever wrote them. `name_tag`: a tag in segment names (e.g. the worker)."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.schema_payload = schema.serialize().to_pybytes()
        self.segment_bytes, self.segment_s, self.fsync_s = segment_bytes, segment_s, fsync_s
        self.retain_s, self.retain_bytes = retain_s, retain_bytes
        self.tag = f"{name_tag}-" if name_tag else ""
        self.auto_rotate = True             # False: only rotate() starts the next segment (a covering writer)
        self._lock = threading.Lock()
        self._fd, self._n, self._size, self._opened, self._dirty, self._header = -1, 0, 0, 0.0, False, 0
        self._closing: list[int] = []       # rotated out, still locked: fsync'd and closed by sync()
        self._created = False               # a segment whose header and name are not fsync'd yet
        self.path: Path | None = None
        self.appended = self.bytes = self.rotations = 0
        self._stop = threading.Event()
        self._syncer = None
        if fsync_s > 0:                     # < 0: only rotation and sync() fsync (a caller that commits)
            self._syncer = threading.Thread(target=self._sync_loop, name="samplelog-fsync", daemon=True)
            self._syncer.start()

    def append(self, payload: bytes, kind: int = BATCH) -> tuple[str, int, int]:
        """Write one record to the kernel; returns its segment's name and where the record
        starts and ends in it."""
        data = frame(kind, payload)
        with self._lock:
            if self._fd < 0 or (self.auto_rotate and self._due()):
                self._rotate()
            pos = self._size
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError:
                os.ftruncate(self._fd, pos)     # no half record before the next one
                raise
            self._size += len(data)
            self._dirty = True
            self.appended += 1
            self.bytes += len(data)
            if self.fsync_s == 0:
                os.fsync(self._fd)
                self._dirty = False
            return self.path.name, pos, self._size

    def _due(self) -> bool:
        return self._size >= self.segment_bytes or time.monotonic() - self._opened >= self.segment_s

    def due(self) -> bool:
        """Whether the open segment holds records and is past its size or age."""
        with self._lock:
            return self._fd >= 0 and self._size > self._header and self._due()

    def rotate(self) -> None:
        """End the open segment; the next append starts a new one. Without the background thread
        the segment is closed (fsync'd, unlocked) before this returns; with it, on its next pass."""
        with self._lock:
            self._detach()
        if self._syncer is None:
            self.sync()

    def _rotate(self) -> None:
        """Detach the open segment and start the next one. Holds self._lock."""
        self._detach()
        self._n += 1
        self.path = self.dir / f"{time.time() * 1000:013.0f}-{self.tag}{os.getpid()}-{self._n:05d}{SUFFIX}"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        header = MAGIC + frame(SCHEMA, self.schema_payload)
        os.write(fd, header)
        self._fd, self._size, self._opened, self._dirty = fd, len(header), time.monotonic(), False
        self._header, self._created = len(header), True
        self.rotations += 1
        if self._syncer is None:            # no thread to do it: durable before the first append returns
            self._settle(self._take())

    def _detach(self) -> None:
        """The open segment stops taking records; sync() closes it. Holds self._lock."""
        if self._fd >= 0:
            self._closing.append(self._fd)
            self._fd = -1

    def _take(self) -> tuple[list[int], bool, int]:
        """What sync() owes the disk, taken under self._lock: segments to close, whether a new
        segment's name must be made durable, and a dup of the open segment if it has unsynced records."""
        closing, created, self._closing, self._created = self._closing, self._created, [], False
        fd = -1
        if self._fd >= 0 and (self._dirty or created):
            fd, self._dirty = os.dup(self._fd), False
        return closing, created, fd

    def _settle(self, owed: tuple[list[int], bool, int]) -> None:
        closing, created, fd = owed
        failed: OSError | None = None
        for old in closing:                 # fsync'd before unlocked: a reader who sees it closed sees it whole
            try:
                os.fsync(old)
                fcntl.flock(old, fcntl.LOCK_UN)
            except OSError as e:
                failed = failed or e
            finally:
                os.close(old)
        if fd >= 0:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if created:                         # owed once: not skipped because an old segment failed
            fsync_dir(self.dir)
        if failed:
            raise failed
        if closing and (self.retain_s > 0 or self.retain_bytes > 0):
            self._sweep()

    def _sweep(self) -> None:
        """Retention: delete closed segments past the age, then the size bound, oldest first."""
        now = time.time()
        segs = []
        for p in sorted(self.dir.glob(f"*{SUFFIX}")):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            segs.append((p, st.st_size, st.st_mtime))
        total = sum(s for _, s, _ in segs)
        for p, size, mtime in segs:
            old = self.retain_s > 0 and now - mtime > self.retain_s
            over = self.retain_bytes > 0 and total > self.retain_bytes
            if not (old or over):
                break
            if p == self.path or locked(p):
                continue
            p.unlink(missing_ok=True)
            total -= size
            log.info("sample log retention: deleted %s (%d bytes)", p.name, size)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.fsync_s):
            try:
                self.sync()
            except OSError:      # e.g. the folder was removed: the thread must outlive it; appends report it
                log.exception("sample log: fsync of %s failed", self.dir)

    def sync(self) -> None:
        """fsync what was appended and close rotated segments (the background thread calls it
        every fsync_s); the disk is waited for outside the lock appends take."""
        with self._lock:
            owed = self._take()
        self._settle(owed)

    def close(self) -> None:
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._lock:
            self._detach()
            owed = self._take()
        self._settle(owed)


class SegmentFile:
    """Reads one segment: its schema, and whole records from a position on."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            if os.pread(self._fd, len(MAGIC), 0) != MAGIC:
                raise ValueError(f"{path}: not a recserve segment (bad magic)")
            rec = self._at(len(MAGIC))
            if rec is None or rec.kind != SCHEMA:
                raise ValueError(f"{path}: no whole schema record after the magic")
        except BaseException:
            os.close(self._fd)
            raise
        self.schema = pa.ipc.read_schema(pa.py_buffer(rec.payload))
        self.first = rec.end                  # position of the first data record

    def _at(self, pos: int) -> Record | None:
        head = os.pread(self._fd, _HEAD.size, pos)
        if len(head) < _HEAD.size:
            return None
        n = _HEAD.unpack(head)[0]
        rec = parse(os.pread(self._fd, _HEAD.size + min(n, MAX_RECORD), pos), 0) if n <= MAX_RECORD else None
        return None if rec is None else Record(rec.kind, pos, pos + rec.end, rec.payload)

    def records(self, pos: int, max_bytes: int = 64 << 20) -> tuple[list[Record], int, int]:
        """Whole records from `pos`, about max_bytes of them (at least one); returns them, where
        reading stopped, and the bytes after that which do not form a whole record (a write in
        progress, or a torn tail once the writer is gone); -1 when reading stopped at max_bytes."""
        pos = max(pos, self.first)
        size = os.fstat(self._fd).st_size
        data = memoryview(os.pread(self._fd, min(size - pos, max_bytes), pos)) if size > pos else memoryview(b"")
        out, at = [], 0
        while True:
            rec = parse(data, at)
            if rec is None:
                break
            out.append(Record(rec.kind, pos + rec.start, pos + rec.end, rec.payload))
            at = rec.end
        if pos + len(data) < size:              # not all of it was read
            if not out:                         # a first record larger than max_bytes
                big = self._at(pos)
                if big is not None:
                    return [big], big.end, -1
            else:
                return out, pos + at, -1
        return out, pos + at, size - (pos + at)

    def record_at(self, pos: int) -> Record:
        rec = self._at(pos)
        if rec is None:
            raise ValueError(f"{self.path}@{pos}: no whole record there")
        return rec

    def close(self) -> None:
        os.close(self._fd)
