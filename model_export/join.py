"""The label join: served impressions joined to the events users sent back, within a window.

Inputs: the sample log's `impressions` and `events` streams (a log folder or Redis streams,
engine.store.samplelog). Output: joined samples in a folder (model_export.joined), each the
impression row as served (ranker inputs included) plus one label per event kind.

- An event names its impression by (request_id, item_id). An event without request_id (older
  clients) goes to the latest impression of the same (user, item) served at most `window_s`
  before the event's time (and at most `skew_s` after it: client clocks).
- An impression's window closes `window_s` after it was served, on the joiner's clock: then
  its rows go out with the labels joined so far; a row with no positive event is a negative.
- A positive that arrives after that (within `late_s`) re-emits the row with its labels as
  they are now and `correction = true` (fast emit: negatives go out on time, late positives
  correct them; the trainer decides how to weigh a correction).
- An event whose request is not read yet waits up to `skew_s` (joiner clock) for it; events that
  find no impression are counted as unmatched.

The joiner's clock is the time of the records it has read; once it has read everything there
is, the wall clock (less END_SLACK_S, for a record in flight) moves it on, so windows close
while traffic is idle. Catching up a backlog, the clock is the oldest newest-record time over
the inputs, so events are read before the windows they belong to close.

Exactly once: every `commit_s` the output since the last commit, the input cursors after
everything it was made from and the state (impressions still in or just after their window,
by reference to their place in the log) are committed together (model_export.joined). A
restart resumes from the last commit: nothing is lost or emitted twice.
"""
from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass, fields
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from engine.core.sections import JoinConfig
from engine.core.request import EVENT_KINDS
from engine.store.samplelog import records
from engine.store.samplelog.source import LogReader
from model_export.joined import JoinedWriter

log = logging.getLogger("recserve.join")

END_SLACK_S = 1.0
_KIND = {k: i for i, k in enumerate(EVENT_KINDS)}


@dataclass
class JoinStats:
    """Cumulative over the joiner's life (they survive restarts through the commits)."""
    impressions: int = 0        # impression rows emitted when their window closed
    joined: int = 0             # of them: with at least one event joined
    positives: int = 0          # of them: with a positive event
    events: int = 0             # events read
    events_joined: int = 0      # events joined to an impression (in its window, or late)
    by_user_item: int = 0       # of them: events without request_id, joined by (user, item, time)
    late_events: int = 0        # events read after their impression's window had closed
    corrections: int = 0        # rows re-emitted because a late positive arrived
    unmatched: int = 0          # events that found no impression
    duplicate_requests: int = 0  # a request_id served twice: the later list wins
    resent: int = 0             # a list logged twice (a writer re-sent it after an unanswered write): read once
    lost_inputs: int = 0        # log partitions deleted or trimmed before they were read
    torn_tails: int = 0         # torn tails skipped in the log (writers killed mid-append)
    commits: int = 0

    def rates(self) -> dict[str, float]:
        imp = max(self.impressions, 1)
        return {"join_rate": self.joined / imp, "positive_rate": self.positives / imp,
                "event_join_rate": self.events_joined / max(self.events, 1)}

    def line(self) -> str:
        r = self.rates()
        return (f"impressions {self.impressions} join_rate {r['join_rate']:.3f} positive_rate "
                f"{r['positive_rate']:.3f} events {self.events} joined {self.events_joined} "
                f"(by user/item {self.by_user_item}) late {self.late_events} corrections {self.corrections} "
                f"unmatched {self.unmatched}")


@dataclass
class _Served:
    """One Recommend's list while it waits for events (and until its late window ends)."""
    partition: str
    start: Any                   # its place in the impressions log (fetched again to emit) ...
    lo: int                      # ... and its rows in the batch there: [lo, lo + len(items))
    t: float
    request_id: str
    user_id: str
    items: dict[str, int]        # item_id -> row
    labels: np.ndarray           # int8 [n, len(EVENT_KINDS)]
    closed: bool = False

    def key(self) -> tuple:
        return (self.partition, str(self.start))


@dataclass
class _Event:
    time: float                  # accepted by the server (unix s)
    event_time: float
    kind: str
    user_id: str
    item_id: str
    request_id: str


class Joiner:
    def __init__(self, cfg: JoinConfig, impressions: LogReader, events: LogReader, out: JoinedWriter,
                 now: Callable[[], float] = time.time):
        self.cfg, self.imp, self.ev, self.out, self.now = cfg, impressions, events, out, now
        self.positive = np.array([k in cfg.positive_kinds for k in EVENT_KINDS])
        self.stats = JoinStats()
        self.cursors: dict[str, dict[str, Any]] = {"impressions": {}, "events": {}}
        self.clock = 0.0
        self.by_request: dict[str, _Served] = {}
        self.by_user_item: dict[tuple[str, str], list[_Served]] = {}
        self.open: list[tuple[float, int, _Served]] = []      # heap by window close
        self.closed: list[tuple[float, int, _Served]] = []    # heap by end of the late window
        self.waiting: list[_Event] = []                       # events whose request is not read yet
        self._n = 0
        self._dirty = False          # read or emitted anything since the last commit
        self._last_commit = now()
        self._restore()

    # -- one round ------------------------------------------------------------------------
    def step(self) -> bool:
        """Read what is there, join, close due windows, commit when due; whether the inputs are
        at their end (a caller following the log sleeps a little then)."""
        started = self.now()
        chunks, imp_cursor, imp_end = self.imp.poll(self.cursors["impressions"])
        for c in chunks:
            for lo, hi in _lists(c.batch):
                self._register(self._served(c.partition, c.start, c.batch, lo, hi))
        self.cursors["impressions"] = imp_cursor
        echunks, ev_cursor, ev_end = self.ev.poll(self.cursors["events"])
        for c in echunks:
            self._events(c.batch)
        self.cursors["events"] = ev_cursor
        self._dirty |= bool(chunks or echunks)
        behind = [_progress(cs) for cs, end in ((chunks, imp_end), (echunks, ev_end)) if not end and cs]
        at_end = imp_end and ev_end
        self.clock = max(self.clock, started - END_SLACK_S if at_end else min(behind, default=self.clock))
        self._retry_waiting()
        self._close_due()
        if self._dirty and self.now() - self._last_commit >= self.cfg.commit_s:
            self.commit()
        return at_end

    def commit(self) -> None:
        """Output so far, input cursors and state, as one commit (model_export.joined)."""
        self.stats.commits += 1
        counters = self.counters()
        counters.pop("pending")
        self.out.commit(self.cursors, counters, self._state(), self.clock)
        for r, stream in ((self.imp, "impressions"), (self.ev, "events")):
            if hasattr(r, "ack"):
                r.ack(self.cursors[stream])
        self._last_commit = self.now()
        self._dirty = False

    def counters(self) -> dict[str, int]:
        d = {f.name: getattr(self.stats, f.name) for f in fields(JoinStats)}
        d["lost_inputs"] = self._base_lost + self.imp.stats.lost_partitions + self.ev.stats.lost_partitions
        d["torn_tails"] = self._base_torn + self.imp.stats.torn_segments + self.ev.stats.torn_segments
        d["pending"] = len(self.open)
        return d

    # -- impressions ----------------------------------------------------------------------
    @staticmethod
    def _served(partition: str, start: Any, batch: pa.RecordBatch, lo: int, hi: int) -> _Served:
        items = batch.column("item_id").slice(lo, hi - lo).to_pylist()
        return _Served(partition, start, lo, float(batch.column("time")[lo].as_py()),
                       batch.column("request_id")[lo].as_py(), batch.column("user_id")[lo].as_py(),
                       {it: k for k, it in enumerate(items)}, np.zeros((len(items), len(EVENT_KINDS)), np.int8))

    def _register(self, s: _Served) -> None:
        old = self.by_request.get(s.request_id)
        if old is not None:
            if old.t == s.t and old.items == s.items and old.user_id == s.user_id:
                self.stats.resent += 1       # one record written twice (a re-send after an unanswered write)
                return
            self.stats.duplicate_requests += 1
        self.by_request[s.request_id] = s
        for it in s.items:
            self.by_user_item.setdefault((s.user_id, it), []).append(s)
        self._n += 1
        if s.closed:
            heapq.heappush(self.closed, (s.t + self.cfg.window_s + self.cfg.late_s, self._n, s))
        else:
            heapq.heappush(self.open, (s.t + self.cfg.window_s, self._n, s))

    # -- events ---------------------------------------------------------------------------
    def _events(self, batch: pa.RecordBatch) -> None:
        cols = [batch.column(n).to_pylist() for n in ("time", "event_time", "kind", "user_id", "item_id",
                                                      "request_id")]
        for row in zip(*cols):
            self.stats.events += 1
            e = _Event(*row)
            if not self._match(e):
                self.waiting.append(e)

    def _retry_waiting(self) -> None:
        still = []
        for e in self.waiting:
            if self._match(e):
                continue
            if self.clock - e.time > self.cfg.skew_s:
                self.stats.unmatched += 1
            else:
                still.append(e)
        self.waiting = still

    def _match(self, e: _Event) -> bool:
        """Join the event if its impression is known; False: not (yet) found."""
        if e.request_id:
            s = self.by_request.get(e.request_id)
            if s is None or e.item_id not in s.items:
                return False
        else:
            s = self._latest(e)
            if s is None:
                return False
            self.stats.by_user_item += 1
        row, kind = s.items[e.item_id], _KIND[e.kind]
        self.stats.events_joined += 1
        if not s.closed:
            s.labels[row, kind] = 1
            return True
        self.stats.late_events += 1
        if self.positive[kind] and not s.labels[row, kind]:
            s.labels[row, kind] = 1
            self._emit(s, np.array([row]), correction=True)
            self.stats.corrections += 1
        return True

    def _latest(self, e: _Event) -> _Served | None:
        """The latest impression of (user, item) served within the window before the event."""
        best = None
        for s in self.by_user_item.get((e.user_id, e.item_id), ()):
            if s.t - self.cfg.skew_s <= e.event_time <= s.t + self.cfg.window_s and (best is None or s.t > best.t):
                best = s
        return best

    # -- windows --------------------------------------------------------------------------
    def _close_due(self) -> None:
        while self.open and self.open[0][0] <= self.clock:
            _, _, s = heapq.heappop(self.open)
            s.closed = True
            self._emit(s, np.arange(len(s.items)), correction=False)
            pos = self.positive[None, :] & (s.labels > 0)
            self.stats.impressions += len(s.items)
            self.stats.joined += int((s.labels > 0).any(axis=1).sum())
            self.stats.positives += int(pos.any(axis=1).sum())
            self._n += 1
            heapq.heappush(self.closed, (s.t + self.cfg.window_s + self.cfg.late_s, self._n, s))
        while self.closed and self.closed[0][0] <= self.clock:
            _, _, s = heapq.heappop(self.closed)
            self._forget(s)

    def _forget(self, s: _Served) -> None:
        if self.by_request.get(s.request_id) is s:
            del self.by_request[s.request_id]
        for it in s.items:
            lst = self.by_user_item.get((s.user_id, it))
            if lst is not None:
                lst[:] = [x for x in lst if x is not s]
                if not lst:
                    del self.by_user_item[(s.user_id, it)]

    def _emit(self, s: _Served, rows: np.ndarray, correction: bool) -> None:
        batch = self.imp.fetch(s.partition, s.start).take(pa.array(rows + s.lo))
        n = len(rows)
        extra = [pa.array(s.labels[rows, k]) for k in range(len(EVENT_KINDS))]
        extra += [pa.array(np.full(n, correction)), pa.array(np.full(n, self.clock)),
                  pa.array([f"{s.partition}@{s.start}"] * n, pa.string())]
        self.out.write(pa.RecordBatch.from_arrays([*batch.columns, *extra], schema=records.JOINED))
        self._dirty = True

    # -- state ----------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        def served(s: _Served) -> list:
            nz = np.argwhere(s.labels)
            return [s.partition, s.start, s.lo, len(s.items), s.closed, nz.tolist()]

        return {"clock": self.clock, "served": [served(s) for _, _, s in self.open + self.closed],
                "waiting": [list(vars(e).values()) for e in self.waiting]}

    def _restore(self) -> None:
        last = self.out.last
        self._base_lost = self._base_torn = 0
        if last is None:
            return
        for f in fields(JoinStats):
            setattr(self.stats, f.name, int(last.counters.get(f.name, 0)))
        self._base_lost, self._base_torn = self.stats.lost_inputs, self.stats.torn_tails
        self.cursors = {k: dict(v) for k, v in last.cursors.items()}
        state = self.out.state() or {}
        self.clock = float(state.get("clock", last.clock))
        for partition, start, lo, n, closed, nz in state.get("served", []):
            s = self._served(partition, start, self.imp.fetch(partition, start), lo, lo + n)
            for row, kind in nz:
                s.labels[row, kind] = 1
            s.closed = closed
            self._register(s)
        self.waiting = [_Event(*row) for row in state.get("waiting", [])]
        log.info("join: resumed after commit %d (%d impressions in or after their window)", last.seq,
                 len(state.get("served", [])))


def _progress(chunks: list) -> float:
    """How far a stream was read, in time: the oldest of its partitions' newest records."""
    newest: dict[str, float] = {}
    for c in chunks:
        if c.batch.num_rows:
            newest[c.partition] = float(c.batch.column("time")[c.batch.num_rows - 1].as_py())
    return min(newest.values(), default=0.0)


def _lists(batch: pa.RecordBatch) -> list[tuple[int, int]]:
    """The row ranges of the served lists in a batch (each starts at position 0)."""
    starts = np.flatnonzero(batch.column("position").to_numpy() == 0)
    return list(zip(starts.tolist(), [*starts[1:].tolist(), batch.num_rows]))
