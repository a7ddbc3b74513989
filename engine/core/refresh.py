"""Periodic background refresh for stages that precompute from the feature store.

The hot and cold-start routes rebuild whole-catalog rankings every second or so; doing
that on a request's critical path would stall it by milliseconds (tens on a 1M catalog),
so requests read the last result and the rebuild happens elsewhere, in one of two ways:

- a daemon thread per refresher (the default): right for a process serving several calls
  at once, but its work shares the interpreter lock with whatever request is running;
- between calls (`between_calls()`, chosen by a single-flight worker process, engine.app.worker):
  refreshers register with this process's Schedule, and the serving loop runs the due ones
  while it has no call, so a request never waits for a rebuild. Under load with no idle
  moment, a refresher overdue by a whole interval runs before the next call anyway, so a
  result is never older than twice its interval.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger("recserve.refresh")


class Schedule:
    """The refreshers of a process that runs them between calls (one serving thread)."""

    def __init__(self) -> None:
        self.items: list[Refresher] = []

    def next_due(self) -> float:
        """time.monotonic() of the earliest due refresh (inf if none)."""
        return min((r.due for r in self.items), default=float("inf"))

    def run_due(self, overdue_only: bool = False) -> int:
        """Run what is due (with `overdue_only`, only what is late by a whole interval); returns how many ran."""
        now, ran = time.monotonic(), 0
        for r in list(self.items):
            if now >= r.due + (r.interval if overdue_only else 0.0):
                r.run()
                ran += 1
        return ran


_schedule: Schedule | None = None


def between_calls() -> Schedule:
    """From now on, refreshers created in this process run between calls through the returned
    Schedule instead of on threads of their own."""
    global _schedule
    if _schedule is None:
        _schedule = Schedule()
    return _schedule


class Refresher:
    def __init__(self, name: str, fn: Callable[[], None], interval_s: float):
        fn()  # the first result exists before any request
        self._fn, self.interval = fn, interval_s
        self.due = time.monotonic() + interval_s
        self._schedule = _schedule
        self._stop = threading.Event()
        if self._schedule is not None:
            self._schedule.items.append(self)
        else:
            self._thread = threading.Thread(target=self._loop, name=f"refresh-{name}", daemon=True)
            self._thread.start()

    def run(self) -> None:
        self.due = time.monotonic() + self.interval
        try:
            self._fn()
        except Exception:  # keep serving the last good result
            log.exception("refresh failed; keeping the previous result")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.run()

    def close(self) -> None:
        self._stop.set()
        if self._schedule is not None and self in self._schedule.items:
            self._schedule.items.remove(self)


class RefreshedRoute:
    """Base of the recall routes whose lists `_refresh()` rebuilds from the feature store in
    the background (hot, cold start). A subclass sets what `_refresh` reads, then calls this
    __init__, which runs the first refresh before any request."""

    def __init__(self, p, env):
        self.p, self.bit, self.store = p, env.route_bit, env.store
        self._refresher = Refresher(env.name, self._refresh, p.refresh_s)

    def _refresh(self) -> None:
        raise NotImplementedError

    def refresh(self) -> None:
        """Rebuild now, on the caller's thread: for offline tools that move the store's state or
        clock between requests (model_export.cascade, recserve eval)."""
        self._refresh()

    def close(self) -> None:
        self._refresher.close()
