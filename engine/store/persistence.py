"""What keeps the embedded store's state across restarts and crashes: snapshots plus the event log.

A snapshot (msgpack, written atomically: tmp file, fsync, rename) holds the arrays and the
sequence of the last logged batch they include; the log (engine.store.eventlog) holds every
batch after it, fsync'd before the batch is acknowledged. Restoring = load the snapshot, replay
the log after its sequence. Taking a snapshot rotates the log and writes the arrays into the
file under the store's write lock (so the file holds exactly the records up to the rotation),
fsyncs it outside the lock, then deletes the log generations it covers. Snapshots are
serialised by a lock file, so two workers closing at once never replace a newer snapshot with
an older one.

One server per state directory: every store open on it holds a shared lock on `stores.lock`;
the server (engine.store.statedir) holds `server.lock` and waits for the previous server's
stores to be gone before it starts.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, ContextManager

import msgpack
import numpy as np

from engine.core.errors import Overloaded
from engine.store.eventlog import EventLog, fsync_dir

log = logging.getLogger("recserve.store")

SNAPSHOT_FORMAT = 2                # 2: the head names the log sequence included (1: none, read as 0)
STORES_LOCK = "stores.lock"


class Persistence:
    def __init__(self, state_dir: str | Path, catalog: str, version: str, meta: np.ndarray,
                 write_lock: Callable[[], ContextManager[None]], sync_lock_file: Path | None,
                 state: Callable[[], dict[str, np.ndarray]],
                 load_state: Callable[[dict[str, np.ndarray]], None]):
        """`meta`: the event log's shared counters; `state()` (called and written out under the
        write lock: live views will do) and `load_state(arrays)`: the store's arrays to and from
        a snapshot."""
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.catalog, self.version = catalog, version
        stem = f"embedded-{catalog[:16]}"
        self.file = self.dir / f"{stem}.msgpack"
        self.log = EventLog(self.dir, stem, meta, write_lock, sync_lock_file)
        self._write_lock = write_lock
        self._state, self._load_state = state, load_state
        self._snap_tlock = threading.Lock()
        self._snap_file = self.dir / f"{stem}.snapshot.lock"
        self._stores = open(self.dir / STORES_LOCK, "a+")   # released when this process closes it
        fcntl.flock(self._stores, fcntl.LOCK_SH)
        self.snapshots = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- start ------------------------------------------------------------------------
    def restore(self, apply: Callable[[list], None]) -> None:
        """Load the snapshot, replay the log after it through `apply(records)`, start a new log
        generation. Caller holds the write lock (the arrays are new: nobody reads them yet)."""
        t0 = time.monotonic()
        seq = last = self._read_snapshot()
        batches = events = 0
        for last, payload in self.log.replay(seq):
            records = msgpack.unpackb(payload)
            apply(records)
            batches, events = batches + 1, events + len(records)
        self.log.start(last)
        if batches:
            log.info("feature state: replayed %d logged events (%d batches, up to #%d) in %.0f ms",
                     events, batches, last, (time.monotonic() - t0) * 1e3)

    def _read_snapshot(self) -> int:
        """Fill the arrays from the snapshot over this catalog, if there is one; the log
        sequence it includes (0: none)."""
        if not self.file.exists():
            return 0
        try:
            with open(self.file, "rb") as f:
                objs = msgpack.Unpacker(f, max_buffer_size=0)
                head = next(objs)
                if head.get("format") not in (1, SNAPSHOT_FORMAT) or head.get("catalog") != self.catalog:
                    raise ValueError(f"not a format {SNAPSHOT_FORMAT} snapshot over this catalog")
                got = {k: np.frombuffer(b, np.dtype(dt)).reshape(shape) for k, dt, shape, b in objs}
        except Exception:  # noqa: BLE001 - a broken snapshot must not keep the server down
            log.exception("%s unusable; starting from the bundle's state (plus the event log)", self.file)
            return 0
        self._load_state(got)
        log.info("feature state restored from %s (written %.0f s ago)", self.file, time.time() - head["unix"])
        return int(head.get("seq", 0))

    # -- the event path ---------------------------------------------------------------
    def append(self, records: list) -> int:
        """Log one batch (caller holds the write lock); its sequence, for commit()."""
        try:
            return self.log.append(msgpack.packb(records))
        except OSError as e:
            raise Overloaded(f"feature store: event log not writable ({e.strerror}); events not accepted") from e

    def commit(self, seq: int) -> None:
        try:
            self.log.commit(seq)
        except OSError as e:
            raise Overloaded(f"feature store: event log not synced ({e.strerror}); events not acknowledged") from e

    # -- snapshots --------------------------------------------------------------------
    @contextlib.contextmanager
    def _snapshot_lock(self):
        with self._snap_tlock, open(self._snap_file, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def save(self) -> None:
        """Snapshot the arrays with the log sequence they include, then drop the log before it.

        The arrays go from the live state straight into the file under the write lock: a copy
        first (released before writing) made the snapshotting worker's private memory swing by
        the whole state (~100 MB on the 1M bundle) every snapshot, for about the same time under
        the lock. Only the fsync waits outside it."""
        with self._snapshot_lock():
            tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                with self._write_lock():
                    seq, gen = self.log.rotate()
                    f.write(msgpack.packb({"format": SNAPSHOT_FORMAT, "catalog": self.catalog,
                                           "bundle": self.version, "unix": time.time(), "seq": seq}))
                    for k, v in self._state().items():
                        _write_array(f, k, v)
                    f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.file)
            fsync_dir(self.dir)
            self.log.drop_through(gen)
        self.snapshots += 1

    def start_snapshots(self, interval_s: float) -> None:
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), name="store-snapshot", daemon=True)
        self._thread.start()

    def _loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.save()
            except OSError:
                log.exception("feature state snapshot to %s failed (the event log keeps growing meanwhile)",
                              self.file)

    def close(self) -> None:
        """Stop the snapshot thread and write a last snapshot: every process sharing the arrays
        does, so the last one to stop includes every event any of them acknowledged."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        try:
            self.save()
        except OSError:
            log.exception("last feature state snapshot to %s failed; the event log still has the events", self.file)
        self.log.close()
        self._stores.close()


def _write_array(f, name: str, v: np.ndarray) -> None:
    """One msgpack object [name, dtype, shape, bin] with the array's bytes written straight from
    its buffer: `packb(... v.tobytes())` made two more copies of every array while holding the
    GIL (~0.2 GB on the 1M bundle, a stall of the snapshotting worker's requests every minute);
    a write from a buffer releases the GIL for the copy into the page cache."""
    v = np.ascontiguousarray(v)
    f.write(b"\x94" + msgpack.packb(name) + msgpack.packb(v.dtype.str) + msgpack.packb(list(v.shape))
            + b"\xc6" + v.nbytes.to_bytes(4, "big"))          # fixarray of 4; bin 32 header
    if v.nbytes:
        f.write(memoryview(v.reshape(-1)).cast("B"))

