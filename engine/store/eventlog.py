"""Append-only event log of the embedded store: an acknowledged event survives SIGKILL and power loss.

The store appends each batch here under its write lock, before it changes the arrays, and
returns (acknowledges) only once the record is fsync'd. At start the store loads its last
snapshot and replays the records after the sequence that snapshot includes; a snapshot rotates
the log to a new generation file and deletes the generations it covers.

One log for every worker process of a server, appended under the same fcntl lock as the
arrays: records get one total order, the order the arrays saw, so a replay rebuilds the same
rings. The fsync happens outside that lock, as a group commit: a caller whose record an fsync
already covered returns at once, and callers that arrive while an fsync runs share the next
one. The sequence numbers, the generation and the end of the current file live in a small
array shared like the state arrays (`meta`), so every worker sees them.

File: 8 bytes of magic, then records `<length u32, crc32 u32, seq u64> payload` (crc32 over
seq and payload). A record cut short or failing its checksum ends the file's replay: it is a
torn tail, never acknowledged (its fsync did not complete). A writer killed mid-append leaves
such a record mid-file: the next append truncates the file back to the last whole record.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import numpy as np

log = logging.getLogger("recserve.store")

MAGIC = b"RSEVLOG1"
_HEAD = struct.Struct("<IIQ")        # payload length, crc32(seq + payload), seq
_SEQ = struct.Struct("<Q")
MAX_RECORD = 1 << 30                 # a longer length field is garbage, not a record
LAST, DURABLE, GEN, END = range(4)   # meta: last seq written, last seq fsync'd, current generation, its end


def new_meta() -> np.ndarray:
    return np.zeros(4, np.int64)


def fsync_dir(path: Path) -> None:
    """Make a created, renamed or deleted directory entry durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EventLog:
    def __init__(self, directory: Path, stem: str, meta: np.ndarray,
                 write_lock: Callable[[], ContextManager[None]], sync_lock_file: Path | None):
        """`meta`: the shared counters (new_meta(), or the same array mapped by every worker);
        `write_lock()`: the store's lock, held by the caller of append and rotate; `sync_lock_file`:
        a file every worker of the server locks around an fsync (None: one process)."""
        self.dir, self.stem, self.meta = Path(directory), stem, meta
        self._write_lock = write_lock
        self._sync_file = sync_lock_file
        self._sync_tlock = threading.Lock()
        self._fd = -1
        self._gen = 0        # generation self._fd is open on
        self.fsyncs = 0      # fsyncs this process did for commits (stats)

    # -- files ------------------------------------------------------------------------
    def _path(self, gen: int) -> Path:
        return self.dir / f"{self.stem}.{gen:010d}.log"

    def generations(self) -> list[int]:
        out = []
        for p in self.dir.glob(f"{self.stem}.*.log"):
            gen = p.name[len(self.stem) + 1:-4]
            if gen.isdigit():
                out.append(int(gen))
        return sorted(out)

    def _create(self) -> int:
        """A new, empty generation after every existing one (a rotation cut short by a killed
        worker may have left one that the shared counters do not name)."""
        gen = max([int(self.meta[GEN]), *self.generations()]) + 1
        with open(self._path(gen), "xb") as f:
            f.write(MAGIC)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.dir)
        return gen

    def _current(self) -> int:
        """The fd of the current generation, reopened if another worker rotated the log."""
        gen = int(self.meta[GEN])
        if gen != self._gen or self._fd < 0:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd, self._gen = os.open(self._path(gen), os.O_WRONLY | os.O_APPEND), gen
        return self._fd

    # -- start ------------------------------------------------------------------------
    def replay(self, after: int) -> Iterator[tuple[int, bytes]]:
        """(seq, payload) of every whole record after sequence `after`, oldest first."""
        for gen in self.generations():
            path = self._path(gen)
            data = path.read_bytes()
            if data[:len(MAGIC)] != MAGIC:
                log.error("%s is not an event log (bad magic); skipped", path)
                continue
            pos = len(MAGIC)
            while pos < len(data):
                if pos + _HEAD.size > len(data):
                    break
                n, crc, seq = _HEAD.unpack_from(data, pos)
                body = data[pos + _HEAD.size:pos + _HEAD.size + n]
                if n > MAX_RECORD or len(body) < n or zlib.crc32(body, zlib.crc32(_SEQ.pack(seq))) != crc:
                    break
                pos += _HEAD.size + n
                if seq > after:
                    yield seq, body
            if pos < len(data):
                log.warning("%s: dropped a torn record at byte %d (%d bytes never acknowledged)",
                            path, pos, len(data) - pos)

    def start(self, last: int) -> None:
        """Continue after sequence `last` in a new generation (never append after a torn tail).
        Caller holds the write lock."""
        gen = self._create()
        self.meta[LAST] = self.meta[DURABLE] = last
        self.meta[END] = len(MAGIC)
        self.meta[GEN] = gen

    # -- the event path ---------------------------------------------------------------
    def append(self, payload: bytes) -> int:
        """Write one record and return its sequence. Caller holds the write lock."""
        fd = self._current()
        end = int(self.meta[END])
        if os.fstat(fd).st_size != end:   # a writer died mid-append: its record was never acknowledged
            os.ftruncate(fd, end)
        seq = int(self.meta[LAST]) + 1
        record = _HEAD.pack(len(payload), zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))), seq) + payload
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            os.ftruncate(fd, end)
            raise
        self.meta[LAST] = seq                 # before END: killed in between, the record is cut back
        self.meta[END] = end + len(record)
        return seq

    @contextlib.contextmanager
    def _sync_lock(self):
        with self._sync_tlock:
            if self._sync_file is None:
                yield
                return
            with open(self._sync_file, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def commit(self, seq: int) -> None:
        """Return once record `seq` is on disk. Group commit: one fsync covers every record
        written before it, so callers waiting for the lock usually find theirs covered."""
        if self.meta[DURABLE] >= seq:
            return
        with self._sync_lock():
            if self.meta[DURABLE] >= seq:
                return
            with self._write_lock():   # what this fsync covers: the current file up to `last`
                upto, fd = int(self.meta[LAST]), os.dup(self._current())
            try:
                os.fsync(fd)           # older generations were fsync'd when rotated
            finally:
                os.close(fd)
            self.fsyncs += 1
            self.meta[DURABLE] = max(int(self.meta[DURABLE]), upto)

    # -- snapshots --------------------------------------------------------------------
    def rotate(self) -> tuple[int, int]:
        """Close the current generation (fsync'd) and start the next; returns the last
        sequence written and the generation closed. Caller holds the write lock: the snapshot
        copied under it includes exactly the records up to that sequence."""
        os.fsync(self._current())
        last, old = int(self.meta[LAST]), int(self.meta[GEN])
        gen = self._create()
        self.meta[DURABLE] = last
        self.meta[END] = len(MAGIC)
        self.meta[GEN] = gen
        return last, old

    def drop_through(self, gen: int) -> None:
        """Delete generations up to `gen`: a durable snapshot holds every record in them."""
        gone = [g for g in self.generations() if g <= gen]
        for g in gone:
            self._path(g).unlink(missing_ok=True)
        if gone:
            fsync_dir(self.dir)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
