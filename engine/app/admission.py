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

A burst is not an overload. A pause of the host (or a few slow answers inflating the average)
lifts the expected wait past `max_queue_ms` for a moment while the workers could drain it at
once; refusing then turns a slow answer into an error at 70% load. So, as CoDel tells a good
queue from a bad one, a call is refused for `max_queue_ms` only once the expected wait has
stood above it for `serving.queue_burst_ms` (every arrival in between saw it above; one below
ends the episode); a call that could not start within its deadline budget (`serving.deadline_ms`,
or the client's own shorter deadline) is refused at once. Under a standing overload the first
burst allowance queues up to a deadline's worth, then the front refuses down to `max_queue_ms`.
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
    burst_ms: float = 0.0       # how long the expected wait may stand above max_queue_ms (0: not at all)
    service_ms: float = INITIAL_SERVICE_MS
    above_since: float | None = None    # monotonic s: when the arrivals began to see a wait above max_queue_ms

    def expected_wait_ms(self, queued: int, idle: int) -> float:
        """What a call arriving now would wait for a worker."""
        if idle > 0:
            return 0.0
        return (queued + 1) * self.service_ms / max(self.workers, 1)

    def refusal(self, queued: int, idle: int, inflight: int, io: bool = False, now: float = 0.0,
                budget_ms: float = float("inf")) -> str | None:
        """None to admit the call, else the reason it is refused (the RESOURCE_EXHAUSTED message).
        `io`: a call for the workers' side threads (ReportEvents), held only to the in-flight cap.
        `now`: the arrival (monotonic s); `budget_ms`: the call's deadline budget."""
        if inflight >= self.inflight_per_worker * max(self.workers, 1):
            return (f"overloaded: {inflight} calls in flight (serving.max_inflight {self.inflight_per_worker} "
                    f"per worker, {self.workers} workers)")
        if io:
            return None
        wait = self.expected_wait_ms(queued, idle)
        if wait <= self.max_queue_ms:
            self.above_since = None
            return None
        ahead = f"~{wait:.0f} ms expected wait for a worker ({queued} queued, {self.workers} workers busy)"
        if wait > budget_ms:
            return f"overloaded: {ahead} exceeds the call's deadline budget {budget_ms:.0f} ms"
        if self.above_since is None:
            self.above_since = now
        if (now - self.above_since) * 1000 < self.burst_ms:
            return None
        return (f"overloaded: {ahead} exceeds serving.max_queue_ms {self.max_queue_ms:g} "
                f"for {(now - self.above_since) * 1000:.0f} ms")

    def observe(self, ms: float) -> None:
        """A worker answered a RecServe call after `ms` of its own work on it."""
        self.service_ms += EWMA_WEIGHT * (ms - self.service_ms)
