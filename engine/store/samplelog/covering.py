"""Raw records on the request path, Arrow batches that cover them built off it.

A Recommend appends its raw record (engine.store.samplelog.raw) to the segment and returns:
written to the kernel, acknowledged. Every `every_s` a background thread converts the raw
records written since its last round into one Arrow record batch and appends it as a COVER
record: `<count u32>` + the IPC batch, covering the oldest `count` raw records not covered
yet (both appends happen in file order, under one lock). Segments rotate only between rounds,
once every raw record in them is covered, so a closed segment is raw records followed by the
Arrow batches of all of them; only a writer killed mid-round leaves raw records no COVER
follows, and readers convert those themselves (engine.store.samplelog.source).
"""
from __future__ import annotations

import logging
import struct
import threading
from typing import Callable

import pyarrow as pa

from engine.store.samplelog import records
from engine.store.samplelog.segments import COVER, RAW, SegmentWriter

log = logging.getLogger("recserve.samplelog")

COUNT = struct.Struct("<I")


def cover_payload(count: int, batch: pa.RecordBatch) -> bytes:
    return COUNT.pack(count) + records.encode(batch)


def split_cover(payload: bytes) -> tuple[int, bytes]:
    return COUNT.unpack_from(payload, 0)[0], payload[COUNT.size:]


class CoveringWriter:
    """A SegmentWriter fed raw records, with the thread that covers them."""

    def __init__(self, seg: SegmentWriter, convert: Callable[[list[bytes]], pa.RecordBatch], every_s: float):
        self.seg, self.convert, self.every_s = seg, convert, every_s
        seg.auto_rotate = False
        self._lock = threading.Lock()          # raw appends and the pending list: one order
        self._round = threading.Lock()         # one covering round at a time
        self._pending: list[bytes] = []
        self.failed = 0                        # raw records whose conversion failed (covered empty)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="samplelog-cover", daemon=True)
        self._thread.start()

    def append(self, payload: bytes) -> None:
        with self._lock:
            self.seg.append(payload, RAW)
            self._pending.append(payload)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.cover()
            except Exception:    # noqa: BLE001 - the thread must outlive a bad round; the next one retries
                log.exception("sample log: covering raw records failed")

    def cover(self) -> None:
        """Cover what is pending (converted outside the lock), then rotate if the segment is due."""
        with self._round:
            with self._lock:
                todo = list(self._pending)
            if todo:
                payload = self._payload(todo)
                with self._lock:
                    self.seg.append(payload, COVER)
                    del self._pending[:len(todo)]
            if self.seg.due():
                with self._lock:               # the few that arrived meanwhile, converted under the lock
                    if self._pending:
                        self.seg.append(self._payload(self._pending), COVER)
                        self._pending.clear()
                    self.seg.rotate()

    def _payload(self, todo: list[bytes]) -> bytes:
        try:
            return cover_payload(len(todo), self.convert(todo))
        except Exception:    # noqa: BLE001 - a conversion bug must not stall readers behind these records
            log.exception("sample log: %d raw records could not be converted; covered empty", len(todo))
            self.failed += len(todo)
            return cover_payload(len(todo), self.convert([]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.cover()
        self.seg.close()
