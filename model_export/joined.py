"""The joiner's output: joined samples and, with them, the input offsets they were made from.

One folder, one writer (the joiner holds `join.lock`). Segments (engine.store.samplelog.
segments) hold BATCH records of the `joined` schema and COMMIT records (JSON: commit sequence,
the input cursors, the joiner's counters, its state file). A commit is the unit of output:
samples between two COMMIT records exist only once the second is fsync'd. The joiner's state
(impressions still waiting in their window, or within the late window) goes to
`state-<seq>.json` before the COMMIT that names it, so the append of one COMMIT record switches
output, input offsets and state at once. At start the joiner cuts whatever follows the last
COMMIT (a batch written by a joiner killed before committing) and resumes from that commit's
cursors and state: a restart neither loses nor repeats a sample.

Readers (the streaming trainer) read only committed samples, commit by commit
(`JoinedReader.read`), and keep the `JoinedOffset` of the last commit they consumed with what
they derived; reading again after it continues exactly there.
"""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from engine.store.eventlog import fsync_dir
from engine.store.samplelog import records
from engine.store.samplelog.segments import BATCH, COMMIT, SUFFIX, SegmentFile, SegmentWriter, locked

LOCK = "join.lock"
KEEP_STATES = 2


@dataclass(frozen=True)
class JoinedOffset:
    """Where a reader of the joined output stands: just after a COMMIT record."""
    segment: str = ""
    pos: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> "JoinedOffset":
        return cls(**d) if d else cls()


@dataclass(frozen=True)
class Commit:
    seq: int
    cursors: dict[str, dict[str, Any]]     # stream -> its reader's cursor after this commit
    counters: dict[str, int]
    state: str                             # state file name ("" for none)
    clock: float
    offset: JoinedOffset                   # where the output stands after this commit


class JoinedWriter:
    """The joiner's side of the output folder."""

    def __init__(self, out: str | Path, segment_bytes: int = 64 << 20):
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / LOCK, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"{self.dir}: another joiner is writing here ({LOCK} is held)") from None
        self.last = self._recover()
        self.seq = self.last.seq if self.last else 0
        self._out = SegmentWriter(self.dir, records.JOINED, segment_bytes=segment_bytes, segment_s=1e12,
                                  fsync_s=-1, name_tag="join")
        self.rows = 0

    def _recover(self) -> Commit | None:
        """The last commit; everything written after it is cut (never committed, never read)."""
        names = sorted(p.name for p in self.dir.glob(f"*{SUFFIX}"))
        last: Commit | None = None
        for name in reversed(names):          # the newest segment holding a commit holds the last one
            try:
                f = SegmentFile(self.dir / name)
            except ValueError:
                continue
            try:
                for r in f.records(0, 1 << 62)[0]:
                    if r.kind == COMMIT:
                        last = _commit(r.payload, JoinedOffset(name, r.end))
            finally:
                f.close()
            if last:
                break
        for name in names:
            path = self.dir / name
            if last is None or name > last.offset.segment:
                path.unlink()
            elif name == last.offset.segment and path.stat().st_size > last.offset.pos:
                os.truncate(path, last.offset.pos)
        fsync_dir(self.dir)
        return last

    def state(self) -> dict[str, Any] | None:
        """The joiner state the last commit names."""
        if not self.last or not self.last.state:
            return None
        return json.loads((self.dir / self.last.state).read_text())

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self._out.append(records.encode(batch))
            self.rows += batch.num_rows

    def commit(self, cursors: dict[str, dict[str, Any]], counters: dict[str, int], state: dict[str, Any],
               clock: float) -> Commit:
        """State file, then the COMMIT record, fsync'd: from here a restart resumes after it."""
        seq = self.seq + 1
        name = f"state-{seq:010d}.json"
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)
        fsync_dir(self.dir)
        body = {"seq": seq, "cursors": cursors, "counters": counters, "state": name, "clock": clock}
        segment, _, end = self._out.append(json.dumps(body, separators=(",", ":")).encode(), COMMIT)
        self._out.sync()
        self.seq = seq
        self.last = Commit(seq, cursors, counters, name, clock, JoinedOffset(segment, end))
        for old in sorted(self.dir.glob("state-*.json"))[:-KEEP_STATES]:
            old.unlink()
        return self.last

    def close(self) -> None:
        self._out.close()
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()


def _commit(payload: bytes, offset: JoinedOffset) -> Commit:
    d = json.loads(payload)
    return Commit(d["seq"], d["cursors"], d["counters"], d.get("state", ""), d.get("clock", 0.0), offset)


class JoinedReader:
    """Committed joined samples, commit by commit, from an offset on (the trainer's input)."""

    def __init__(self, out: str | Path):
        self.dir = Path(out)

    def read(self, after: JoinedOffset = JoinedOffset(), max_rows: int = 1 << 62
             ) -> Iterator[tuple[pa.Table, Commit]]:
        """(the samples of one commit, that commit) for every commit after `after`, in order;
        stops after the commit that reaches max_rows, or at the last commit written."""
        rows = 0
        for name in sorted(p.name for p in self.dir.glob(f"*{SUFFIX}")):
            if name < after.segment:
                continue
            try:
                f = SegmentFile(self.dir / name)
            except (ValueError, FileNotFoundError):
                continue
            try:
                pending: list[pa.RecordBatch] = []
                start = after.pos if name == after.segment else 0
                for r in f.records(start, 1 << 62)[0]:
                    if r.kind == BATCH:
                        pending.append(records.decode(r.payload, f.schema))
                    elif r.kind == COMMIT:
                        table = pa.Table.from_batches(pending, records.JOINED)
                        pending = []
                        rows += table.num_rows
                        yield table, _commit(r.payload, JoinedOffset(name, r.end))
                        if rows >= max_rows:
                            return
            finally:
                f.close()

    def last_commit(self) -> Commit | None:
        last = None
        for _, c in self.read():
            last = c
        return last


def writer_alive(out: str | Path) -> bool:
    """Whether a joiner holds the folder (a trainer waits for more while one does)."""
    return locked(Path(out) / LOCK)
