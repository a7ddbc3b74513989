"""Admission by expected queue time: refuse at arrival what would wait too long for a worker.

A CPU-bound server past its capacity only grows its queue: every accepted call then waits
longer than its deadline and goodput falls to what finishes in time. The front therefore
answers RESOURCE_EXHAUSTED at once (no queueing, no engine work) when the wait a new call
can expect exceeds `serving.max_queue_ms`, so the calls it accepts keep their latency and the
workers stay busy with them. The expectation needs no tuning to the machine or the bundle:
with every worker busy and `queued` calls ahead, a new call starts after `queued + 1` of the
`workers` busy workers finish, ~(queued + 1) x service / workers, where service is a moving
average of the workers' own time on recent RecServe calls (not Admin calls, not time a call
sat behind a hot reload). `serving.max_inflight` per worker stays a hard cap.
"""
from __future__ import annotations

from dataclasses import dataclass

EWMA_WEIGHT = 0.05          # ~the last 20 answers: follows a change of load within a fraction of a second
INITIAL_SERVICE_MS = 10.0   # until the first answers arrive


@dataclass
class Admission:
    workers: int                # worker processes attached to the front
    max_queue_ms: float         # longest expected wait accepted
    inflight_per_worker: int    # accepted calls (queued + running) at most, per worker
    service_ms: float = INITIAL_SERVICE_MS

    def expected_wait_ms(self, queued: int, idle: int) -> float:
        """What a call arriving now would wait for a worker."""
        if idle > 0:
            return 0.0
        return (queued + 1) * self.service_ms / max(self.workers, 1)

    def refusal(self, queued: int, idle: int, inflight: int, io: bool = False) -> str | None:
        """None to admit the call, else the reason it is refused (the RESOURCE_EXHAUSTED message).
        `io`: a call for the workers' side threads (ReportEvents), held only to the in-flight cap."""
        if inflight >= self.inflight_per_worker * max(self.workers, 1):
            return (f"overloaded: {inflight} calls in flight (serving.max_inflight {self.inflight_per_worker} "
                    f"per worker, {self.workers} workers)")
        if io:
            return None
        wait = self.expected_wait_ms(queued, idle)
        if wait > self.max_queue_ms:
            return (f"overloaded: ~{wait:.0f} ms expected wait for a worker ({queued} queued, {self.workers} "
                    f"workers busy) exceeds serving.max_queue_ms {self.max_queue_ms:g}")
        return None

    def observe(self, ms: float) -> None:
        """A worker answered a RecServe call after `ms` of its own work on it."""
        self.service_ms += EWMA_WEIGHT * (ms - self.service_ms)
