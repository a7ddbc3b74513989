"""Prometheus series of a worker (engine.app.service): in multiprocess mode the supervisor's
scrape sums them over the workers, and the front counts its refusals in the same series."""
from __future__ import annotations

from typing import Any

_LATENCY_BUCKETS = (.001, .002, .004, .006, .008, .01, .015, .02, .03, .05, .075, .1, .15, .25, .5, 1.0)
_STAGE_BUCKETS = (.0001, .00025, .0005, .001, .002, .004, .008, .015, .03, .06, .1, .25)


class Metrics:
    """Prometheus series of one worker; in multiprocess mode the parent's scrape sums them."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("recserve_requests", "RPCs by method and status code", ["method", "code"])
        self.latency = Histogram("recserve_request_seconds", "server-side RPC latency", ["method"],
                                 buckets=_LATENCY_BUCKETS)
        self.stage = Histogram("recserve_stage_seconds", "latency per recall route and stage", ["stage"],
                               buckets=_STAGE_BUCKETS)
        # a counter, not a histogram: divided by recserve_stage_seconds_count it is the mean
        # batch size, at a fraction of the cost (a histogram observe costs several us, per stage)
        self.candidates = Counter("recserve_stage_candidates", "candidates leaving each stage", ["stage"])
        self.stage_status = Counter("recserve_stage_outcomes", "stage runs that did not end ok",
                                    ["stage", "status"])
        self.degraded = Counter("recserve_degraded_responses", "answers served degraded")
        self.events = Counter("recserve_events", "reported events", ["result"])
        self.reloads = Counter("recserve_bundle_reloads", "hot reload attempts", ["result"])
        self.bundle = Gauge("recserve_bundle_info", "1 for the bundle version a worker serves", ["version"],
                            multiprocess_mode="liveall")
        self.store = Gauge("recserve_feature_store", "feature store counters: buffered events, fallbacks, ...",
                           ["counter"], multiprocess_mode="liveall")
        self.rss = Gauge("recserve_worker_rss_bytes", "resident memory of a worker", multiprocess_mode="liveall")
        self._children: dict[str, tuple[Any, Any]] = {}

    def observe(self, resp: Any) -> None:
        for t in resp.trace:
            if t.name not in self._children:      # labels() costs a lock and a dict per call
                self._children[t.name] = (self.stage.labels(t.name), self.candidates.labels(t.name))
            seconds, candidates = self._children[t.name]
            seconds.observe(t.ms / 1000)
            candidates.inc(t.count_out)
            if t.status != "ok":
                self.stage_status.labels(t.name, t.status).inc()
        if resp.degraded:
            self.degraded.inc()
