"""Periodic background refresh for stages that precompute from the feature store.

The hot and cold-start routes rebuild whole-catalog rankings every second or so; doing
that on a request thread would stall one request per interval by milliseconds (tens on a
1M catalog), so a daemon thread does it and requests read the last result.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger("recserve.refresh")


class Refresher:
    def __init__(self, name: str, fn: Callable[[], None], interval_s: float):
        fn()  # the first result exists before any request
        self._fn, self._interval = fn, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"refresh-{name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._fn()
            except Exception:  # keep serving the last good result
                log.exception("refresh failed; keeping the previous result")

    def close(self) -> None:
        self._stop.set()


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
