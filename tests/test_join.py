"""The label join on real segment files: windows, late positives, events without request_id,
torn tails and restarts (model_export.join, model_export.joined)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from engine.core.sections import JoinConfig
from engine.store.samplelog import records
from engine.store.samplelog.raw import raw_record
from engine.store.samplelog.covering import CoveringWriter
from engine.store.samplelog.raw import raw_batch
from engine.store.samplelog.segments import SegmentWriter
from engine.store.samplelog.source import SegmentLog
from model_export.join import Joiner
from model_export.joined import JoinedReader, JoinedWriter

T0 = 1_700_000_000.0
WINDOW = 60.0


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Log:
    """A log folder written the way a server writes it (one writer per stream); the raw records
    get their Arrow batch when `step` covers them (or never, for a writer that dies first)."""

    def __init__(self, d):
        self.dir = d
        self.imp = CoveringWriter(SegmentWriter(d / "impressions", records.IMPRESSIONS, fsync_s=-1), raw_batch,
                                  every_s=3600)
        self.ev = SegmentWriter(d / "events", records.EVENTS, fsync_s=-1)

    def served(self, rid: str, user: str, items: list[str], t: float) -> None:
        n = len(items)
        self.imp.append(raw_record(
            request_id=rid, time=t, user_id=user, user_index=0, item_ids=items, items=np.arange(n),
            experiment="", bundle_version="v1", routes=[["ann"]] * n, scores=np.linspace(1, 0, n),
            predictions={"click": np.full(n, 0.1, np.float32)}, context={"hour": 1}, degraded=False,
            now_days=1.0, user_x=np.ones(3, np.float32), item_x=np.arange(n * 2, dtype=np.float32).reshape(n, 2),
            recent=np.array([5, -1], np.int32)))

    def event(self, kind: str, user: str, item: str, t: float, rid: str = "", event_time: float = 0.0) -> None:
        self.ev.append(records.encode(records.event_batch(t, [kind], [user], [item], [rid], [event_time])))

    def close(self) -> None:
        self.imp.close()
        self.ev.close()


def step(j: Joiner, log: Log) -> bool:
    log.imp.cover()          # what the writer's thread does every log.batch_ms
    return j.step()


def joiner(log: Log, out, clock: Clock, **cfg) -> Joiner:
    c = JoinConfig(window_s=WINDOW, late_s=600.0, skew_s=10.0, commit_s=1e9, **cfg)
    return Joiner(c, SegmentLog(log.dir, "impressions"), SegmentLog(log.dir, "events"), JoinedWriter(out), now=clock)


def rows(out) -> list[dict]:
    return [r for table, _ in JoinedReader(out).read() for r in table.to_pylist()]


@pytest.fixture
def log(tmp_path):
    lg = Log(tmp_path / "log")
    yield lg
    lg.close()


def test_window_close_emits_negatives_and_joined_positives(log, tmp_path):
    clock = Clock(T0 + 1)
    log.served("r1", "u1", ["a", "b", "c"], T0)
    log.event("click", "u1", "b", T0 + 5, rid="r1")
    log.event("like", "u1", "b", T0 + 6, rid="r1")
    log.event("impression", "u1", "c", T0 + 2, rid="r1")
    j = joiner(log, tmp_path / "out", clock)
    step(j, log)
    assert j.stats.impressions == 0 and rows(tmp_path / "out") == []    # window still open
    clock.t = T0 + WINDOW + 2
    step(j, log)
    j.commit()
    got = {r["item_id"]: r for r in rows(tmp_path / "out")}
    assert set(got) == {"a", "b", "c"}
    assert (got["b"]["label_click"], got["b"]["label_like"], got["b"]["label_finish"]) == (1, 1, 0)
    assert all(v == 0 for k, v in got["a"].items() if k.startswith("label_"))      # the negative
    assert got["c"]["label_impression"] == 1 and got["c"]["label_click"] == 0     # shown, not a positive
    assert not any(r["correction"] for r in got.values())
    assert got["b"]["item_x"] == [2.0, 3.0] and got["b"]["position"] == 1         # the row as served
    s = j.stats
    assert (s.impressions, s.joined, s.positives, s.events, s.events_joined) == (3, 2, 1, 3, 3)
    assert j.stats.rates()["positive_rate"] == pytest.approx(1 / 3)


def test_late_positive_is_emitted_as_a_correction(log, tmp_path):
    clock = Clock(T0 + WINDOW + 2)
    log.served("r1", "u1", ["a", "b"], T0)
    j = joiner(log, tmp_path / "out", clock)
    step(j, log)
    assert j.stats.impressions == 2 and j.stats.positives == 0
    log.event("click", "u1", "a", T0 + WINDOW + 30, rid="r1")
    log.event("click", "u1", "a", T0 + WINDOW + 31, rid="r1")        # a repeat corrects nothing more
    log.event("dislike", "u1", "b", T0 + WINDOW + 32, rid="r1")      # late, but not a positive
    clock.t = T0 + WINDOW + 40
    step(j, log)
    j.commit()
    out = rows(tmp_path / "out")
    corrections = [r for r in out if r["correction"]]
    assert len(out) == 3 and len(corrections) == 1
    assert corrections[0]["item_id"] == "a" and corrections[0]["label_click"] == 1
    assert (j.stats.late_events, j.stats.corrections) == (3, 1)
    assert j.stats.impressions == 2          # a correction is not a new impression


def test_events_without_request_id_join_the_latest_impression_in_the_window(log, tmp_path):
    clock = Clock(T0)
    log.served("old", "u1", ["a", "b"], T0)
    log.served("new", "u1", ["a", "c"], T0 + 20)
    log.served("other-user", "u2", ["a"], T0 + 21)
    log.event("click", "u1", "a", T0 + 25, event_time=T0 + 25)            # -> "new", not "old"
    log.event("click", "u1", "b", T0 + 25, event_time=T0 + 25)            # only "old" served b
    log.event("click", "u1", "c", T0 + 26, event_time=T0 + 20 + WINDOW + 5)   # after new's window: no match
    j = joiner(log, tmp_path / "out", clock)
    step(j, log)
    clock.t = T0 + 200
    step(j, log)
    j.commit()
    got = {(r["request_id"], r["item_id"]): r["label_click"] for r in rows(tmp_path / "out")}
    assert got == {("old", "a"): 0, ("old", "b"): 1, ("new", "a"): 1, ("new", "c"): 0, ("other-user", "a"): 0}
    assert (j.stats.by_user_item, j.stats.unmatched) == (2, 1)


def test_an_event_read_before_its_impression_waits_for_it(log, tmp_path):
    clock = Clock(T0 + 1)
    log.event("click", "u1", "a", T0 + 1, rid="r1")
    j = joiner(log, tmp_path / "out", clock)
    step(j, log)                                   # the event first: its request is not in the log yet
    log.served("r1", "u1", ["a"], T0)
    step(j, log)
    clock.t = T0 + WINDOW + 5
    step(j, log)
    j.commit()
    assert [r["label_click"] for r in rows(tmp_path / "out")] == [1]
    assert j.stats.unmatched == 0


def test_restart_resumes_after_the_last_commit_without_loss_or_repeats(log, tmp_path):
    out = tmp_path / "out"
    clock = Clock(T0)
    for k in range(5):
        log.served(f"r{k}", "u1", ["a", "b"], T0 + k)
    j = joiner(log, out, clock)
    step(j, log)
    log.event("click", "u1", "a", T0 + 10, rid="r1")
    clock.t = T0 + WINDOW + 2.5             # closes r0 and r1
    step(j, log)
    j.commit()
    log.event("click", "u1", "b", T0 + WINDOW + 3, rid="r3")    # joins r3, which is still open
    clock.t = T0 + WINDOW + 4.5             # closes r2, r3: written but never committed
    step(j, log)
    j.out._out.close()                      # the joiner dies here (its lock goes with the process)
    j.out._lock.close()

    clock.t = T0 + WINDOW + 4.5
    j2 = joiner(log, out, clock)            # restarts from the commit: r2..r4 pending, the event unread
    clock.t = T0 + WINDOW + 10
    step(j2, log)
    j2.commit()
    got = [(r["request_id"], r["item_id"], r["label_click"]) for r in rows(out)]
    assert sorted(got) == sorted([(f"r{k}", i, int((k, i) in {(1, "a"), (3, "b")}))
                                  for k in range(5) for i in "ab"])
    assert j2.stats.impressions == 10 and j2.stats.events == 2 and j2.stats.commits == 2


def test_torn_tail_of_a_killed_writer_is_skipped_and_counted(log, tmp_path):
    """A writer killed with raw records not yet covered and half a record written: the reader
    converts the raw records itself and skips the half record."""
    log.served("r1", "u1", ["a"], T0)
    log.imp.cover()
    log.served("r2", "u1", ["b"], T0 + 1)   # never covered
    path = log.imp.seg.path
    log.imp._stop.set()
    log.imp.seg.close()                     # the writer is gone (unlocked) ...
    whole = path.stat().st_size
    with open(path, "ab") as f:             # ... and left half a record behind
        f.write(b"\x40\x00\x00\x00\x12\x34")
    clock = Clock(T0 + WINDOW + 5)
    j = joiner(log, tmp_path / "out", clock)
    j.step()
    j.commit()
    assert sorted(r["request_id"] for r in rows(tmp_path / "out")) == ["r1", "r2"]
    assert j.imp.stats.uncovered == 1
    assert j.counters()["torn_tails"] == 1 and os.path.getsize(path) == whole + 6
    assert j.cursors["impressions"][path.name] == -1    # done: a restart does not read it again


def test_a_second_joiner_on_the_same_output_is_refused(log, tmp_path):
    j = joiner(log, tmp_path / "out", Clock(T0))
    with pytest.raises(RuntimeError, match="another joiner"):
        JoinedWriter(tmp_path / "out")
    j.out.close()


def test_recserve_join_follows_the_log_and_commits_on_sigterm(log, tmp_path):
    """`recserve join --follow`: joins what arrives while it runs; SIGTERM commits and exits 0."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO, wait_for

    now = time.time()
    log.served("early", "u1", ["a", "b"], now - 30)
    log.imp.cover()
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli.main", "join", "--config", "configs/tiny.toml",
                             "--log", str(log.dir), "--out", str(out), "--follow", "--set", "join.window_s=1.0",
                             "--set", "join.commit_s=0.2"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(rows(out)) == 2, timeout=60, what="the first list joined")
        log.served("late", "u1", ["c"], time.time())
        log.event("click", "u1", "c", time.time(), rid="late")
        log.imp.cover()
        wait_for(lambda: len(rows(out)) == 3, timeout=60, what="the list served while it ran")
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert {(r["request_id"], r["item_id"]): r["label_click"] for r in rows(out)} == {
        ("early", "a"): 0, ("early", "b"): 0, ("late", "c"): 1}
    assert "join_rate" in stdout and "corrections 0" in stdout


def test_a_list_logged_twice_is_joined_once(log, tmp_path):
    """A writer that re-sends a record after an unanswered write (Redis went away mid-XADD) logs
    the same list twice: it is joined once, and counted."""
    clock = Clock(T0 + 1)
    log.served("r1", "u1", ["a", "b"], T0)
    log.served("r1", "u1", ["a", "b"], T0)            # the same record again
    log.event("click", "u1", "a", T0 + 0.5, rid="r1")
    j = joiner(log, tmp_path / "out", clock)
    step(j, log)
    clock.t = T0 + WINDOW + 2
    step(j, log)
    j.commit()
    got = rows(tmp_path / "out")
    assert sorted((r["item_id"], r["label_click"]) for r in got) == [("a", 1), ("b", 0)]
    assert (j.stats.resent, j.stats.duplicate_requests) == (1, 0)
