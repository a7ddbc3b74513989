"""The serving side of the sample log: what Recommend served and ReportEvents accepted, written
before the answer leaves (engine.store.samplelog holds the format, the writers and readers).

Each worker process (or Ray replica) has its own writer: segment files of its own in the log
folder (`log.backend = "files"`), or entries on shared Redis streams (`"redis"`). Logging
never fails a call: an error is logged, counted (GetStatus `samplelog.*`, Prometheus
`recserve_samplelog_records{stream,result}`) and the answer goes out regardless.
"""
from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

from engine.core.sections import LogConfig
from engine.core.request import Event, Response
from engine.store.samplelog import records
from engine.store.samplelog.covering import CoveringWriter
from engine.store.samplelog.raw import raw_batch, raw_record
from engine.store.samplelog.segments import SegmentWriter

log = logging.getLogger("recserve.samplelog")

_COUNTER: Any = None


def _counter():
    """One Prometheus counter per process (a second Service in the process shares it)."""
    global _COUNTER
    if _COUNTER is None:
        from prometheus_client import Counter

        _COUNTER = Counter("recserve_samplelog_records", "sample log records by stream and result",
                           ["stream", "result"])
    return _COUNTER


def new_request_id() -> str:
    """For a Recommend sent without one: what the client quotes back in its events."""
    return uuid.uuid4().hex


def log_dir(cfg: LogConfig, bundle_root: Path) -> Path | None:
    """`log.dir`; else `<state dir>/samples`, the state dir as the embedded store resolves it
    without --state-dir ($RECSERVE_STATE_DIR, else the default for the bundle root); None when
    that says `none` (a memory-only run writes nothing unless log.dir names a folder)."""
    if cfg.dir:
        return Path(cfg.dir).expanduser()
    from engine.store import statedir

    root = bundle_root if (bundle_root / "CURRENT").exists() else bundle_root.parent
    state = statedir.resolve(None, root, embedded=True)
    return Path(state) / "samples" if state else None


class SampleLog:
    """One process's writers of the impressions and events streams."""

    def __init__(self, cfg: LogConfig, d: Path | None, worker: int = 0):
        """`d`: the folder of the files backend (log_dir)."""
        if cfg.backend == "files":
            kw = dict(segment_bytes=int(cfg.segment_mb * 2**20), segment_s=cfg.segment_s, fsync_s=cfg.fsync_s,
                      retain_s=cfg.retain_hours * 3600, retain_bytes=int(cfg.retain_gb * 2**30), name_tag=f"w{worker}")
            self.imp = CoveringWriter(SegmentWriter(d / "impressions", records.IMPRESSIONS, **kw), raw_batch,
                                      cfg.batch_ms / 1000)
            self.ev = SegmentWriter(d / "events", records.EVENTS, **kw)
            self.where = str(d)
        else:
            from engine.store.samplelog.streams import StreamWriter

            self.imp = StreamWriter(cfg.redis_url, "impressions", cfg.stream_maxlen, cfg.buffer, raw=True)
            self.ev = StreamWriter(cfg.redis_url, "events", cfg.stream_maxlen, cfg.buffer)
            self.where = cfg.redis_url.split("?", 1)[0]
        self.counts = {f"{s}_{r}": 0 for s in ("impressions", "events") for r in ("ok", "failed")}
        self.calls = self.time_us = 0     # Recommends logged, and the time it took them (the cost, measured)
        metric = _counter()     # labels() takes a lock and a dict lookup: the children are kept
        self._metric = {k: metric.labels(*k.split("_")) for k in self.counts}
        log.info("sample log: %s backend at %s", cfg.backend, self.where)

    def recommend(self, user_id: str, context: dict[str, int], resp: Response) -> None:
        """Log the served list (fail-open)."""
        inp = resp.inputs
        if inp is None or not resp.item_ids:
            return
        t0 = time.perf_counter()
        try:
            payload = raw_record(
                request_id=resp.request_id, time=time.time(), user_id=user_id, user_index=inp.user_index,
                item_ids=resp.item_ids, items=inp.items, experiment=resp.experiment,
                bundle_version=resp.bundle_version, routes=resp.routes, scores=resp.scores,
                predictions=resp.task_scores, context=context, degraded=resp.degraded, now_days=inp.now,
                user_x=inp.user, item_x=inp.item, recent=inp.recent)
            self.imp.append(payload)
            self._count("impressions", "ok", len(resp.item_ids))
        except Exception:    # noqa: BLE001 - logging never fails a Recommend
            log.exception("sample log: impressions of request %s not written", resp.request_id)
            self._count("impressions", "failed", len(resp.item_ids))
        self.time_us += int((time.perf_counter() - t0) * 1e6)
        self.calls += 1

    def events(self, events: list[Event], rejected: set[int]) -> None:
        """Log the accepted events of one ReportEvents call (fail-open)."""
        ok = [e for i, e in enumerate(events) if i not in rejected]
        if not ok:
            return
        try:
            batch = records.event_batch(time.time(), [e.kind for e in ok], [e.user_id for e in ok],
                                        [e.item_id for e in ok], [e.request_id for e in ok],
                                        [e.timestamp for e in ok])
            self.ev.append(records.encode(batch))
            self._count("events", "ok", len(ok))
        except Exception:    # noqa: BLE001 - an accepted event is still accepted by the feature store
            log.exception("sample log: %d accepted events not written", len(ok))
            self._count("events", "failed", len(ok))

    def _count(self, stream: str, result: str, n: int) -> None:
        key = f"{stream}_{result}"
        self.counts[key] += n      # under the GIL; a lost increment is a counter off by one
        self._metric[key].inc(n)

    def flush(self) -> None:
        """Cover the raw records written so far with their Arrow batch now (files backend)."""
        if isinstance(self.imp, CoveringWriter):
            self.imp.cover()

    def stats(self) -> dict[str, int]:
        out = {**self.counts, "recommend_calls": self.calls, "recommend_us": self.time_us}
        if isinstance(self.imp, CoveringWriter):
            out["impressions_unconverted"] = self.imp.failed
        for name, w in (("impressions", self.imp), ("events", self.ev)):
            for k in ("buffered", "dropped"):
                if hasattr(w, k):
                    out[f"{name}_{k}"] = getattr(w, k)
        return out

    def close(self) -> None:
        for w in (self.imp, self.ev):
            try:
                w.close()
            except Exception:    # noqa: BLE001 - closing on shutdown: report, carry on
                log.exception("sample log: closing a writer failed")
