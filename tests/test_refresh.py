"""Background refresh of the routes' precomputed lists: on its own thread, or between calls."""
from __future__ import annotations

import threading
import time

import pytest

from engine.core import refresh


class Counter:
    def __init__(self, fail_at: int = -1):
        self.n, self.fail_at, self.ran = 0, fail_at, threading.Event()

    def __call__(self) -> None:
        self.n += 1
        if self.n >= 2:
            self.ran.set()
        if self.n == self.fail_at:
            raise RuntimeError("store unreachable")


@pytest.fixture
def schedule(monkeypatch):
    s = refresh.Schedule()
    monkeypatch.setattr(refresh, "_schedule", s)
    return s


def test_between_calls_runs_only_what_is_due_and_never_on_a_thread(schedule):
    fn = Counter()
    before = threading.active_count()
    r = refresh.Refresher("hot", fn, interval_s=60)
    assert fn.n == 1 and threading.active_count() == before     # first result at once, no thread
    assert schedule.items == [r] and schedule.next_due() == r.due
    assert schedule.run_due() == 0 and fn.n == 1                 # not due yet
    r.due -= 60                                                   # its time has come
    assert schedule.run_due(overdue_only=True) == 0              # due, but not late by a whole interval
    assert schedule.run_due() == 1 and fn.n == 2 and r.due > time.monotonic() + 59
    r.due -= 120                                                  # busy for two intervals
    assert schedule.run_due(overdue_only=True) == 1 and fn.n == 3
    r.close()
    assert schedule.items == [] and schedule.next_due() == float("inf")


def test_a_failing_refresh_keeps_its_schedule(schedule):
    fn = Counter(fail_at=2)
    r = refresh.Refresher("cold", fn, interval_s=60)
    r.due = 0.0
    assert schedule.run_due() == 1 and fn.n == 2                 # raised, logged, not propagated
    assert r.due > time.monotonic()
    r.due = 0.0
    schedule.run_due()
    assert fn.n == 3


def test_without_a_schedule_a_thread_refreshes():
    fn = Counter()
    r = refresh.Refresher("hot", fn, interval_s=0.01)
    try:
        assert fn.ran.wait(10), "the refresh thread never ran"
    finally:
        r.close()
