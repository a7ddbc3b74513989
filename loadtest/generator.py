"""Load generator processes: closed loop (C clients back to back) or open loop (Poisson arrivals).

Each generator is its own process (spawned by loadtest.coordinator, so it never shares the
server's or the coordinator's GIL) running grpc.aio over several TCP connections. On the 2-core box one
aio process drove ~2.3k calls/s at ~0.65 core, on par with blocking calls from threads,
and the open loop needs thousands of pending timers rather than threads. Open-loop latency is
measured from each request's *intended* send time, so a server (or generator) that falls
behind shows up in the percentiles instead of silently thinning the arrivals (coordinated
omission). Only requests whose intended send time falls in the measured window (after the
warm-up, before the duration or request budget runs out) count, and every one of them ends
as OK or exactly one error code: `sent == ok + errors` always holds.
"""
from __future__ import annotations

import asyncio
import collections
import random
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import grpc
import numpy as np
from hdrh.histogram import HdrHistogram

from protos import pb2, pb2_grpc

METHODS = ("Recommend", "ReportEvents")
# overload: the accepted calls' latency apart from how fast the excess is refused, the latter also
# from the moment the call was actually sent (the generator's own lag behind its schedule left out)
OUTCOMES = ("ok", "refused", "refused_from_send")
OUTCOME_OF = {"OK": "ok", "RESOURCE_EXHAUSTED": "refused"}
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}
_HIST_MAX_US = 3_600_000_000
CONNECT_TIMEOUT_S = 30.0
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]   # one TCP connection per channel


class LoadError(RuntimeError):
    """A generator could not connect or crashed; the message says which and why."""


@dataclass(frozen=True)
class LoadSpec:
    target: str
    user_ids: str                # path of the bundle's tables/user_ids.npy
    concurrency: int = 0         # > 0: closed loop with this many clients in all
    qps: float = 0.0             # > 0: open loop at this offered rate in all
    duration_s: float = 10.0
    warmup_s: float = 2.0
    max_requests: int = 100_000  # measured requests in all; the window ends early when reached
    zipf_s: float = 1.1          # user popularity exponent
    unknown_share: float = 0.05  # requests from users the bundle has never seen
    event_ratio: float = 0.0     # share of calls that report events on a just-served list
    trace_sample: float = 0.02   # share of Recommend calls sent with debug=True (stage trace)
    count: int = 0               # items per request; 0: the server's default
    timeout_s: float = 5.0
    token: str | None = None
    procs: int = 1
    channels: int = 8            # connections per generator process
    seed: int = 0
    interval_s: float = 0.0      # > 0: also Recommend latency and status codes per interval (soak)

    def __post_init__(self) -> None:
        if (self.concurrency > 0) == (self.qps > 0):
            raise ValueError("give either concurrency (closed loop) or qps (open loop), both > 0")
        if min(self.duration_s, self.max_requests, self.procs, self.channels, self.timeout_s) <= 0 or self.warmup_s < 0:
            raise ValueError("duration, max_requests, procs, channels and timeout must be > 0, warm-up >= 0")
        if self.interval_s < 0:
            raise ValueError("interval must be >= 0")

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency > 0 else "open"


class Users:
    """Zipf(s) over the bundle's users in one fixed random rank order (the same heavy users in
    every generator process), plus a share of never-seen users who exercise cold start."""

    def __init__(self, ids: np.ndarray, s: float, unknown_share: float, seed: int, stream: int):
        self.ids = np.asarray(ids)[np.random.default_rng(seed).permutation(len(ids))]
        w = np.arange(1, len(ids) + 1, dtype=np.float64) ** -s
        self.cdf = np.cumsum(w) / w.sum()
        self.unknown_share = unknown_share
        self.rng = np.random.default_rng([seed, stream])
        self.prefix = f"loadtest-new-{seed}-{stream}-"
        self.n_new = 0
        self.buf: list[str] = []

    def next(self) -> str:
        if not self.buf:
            self.buf = self._draw(4096)
        return self.buf.pop()

    def _draw(self, n: int) -> list[str]:
        ranks = np.minimum(np.searchsorted(self.cdf, self.rng.random(n), side="right"), len(self.cdf) - 1)
        out = [str(u) for u in self.ids[ranks].tolist()]
        for i in np.flatnonzero(self.rng.random(n) < self.unknown_share).tolist():
            out[i] = f"{self.prefix}{self.n_new}"
            self.n_new += 1
        return out


def new_hist() -> HdrHistogram:
    return HdrHistogram(1, _HIST_MAX_US, 3)


def percentiles_ms(h: HdrHistogram) -> dict[str, float]:
    out = {k: h.get_value_at_percentile(p) / 1e3 for k, p in PERCENTILES.items()}
    return out | {"max": h.get_max_value() / 1e3, "mean": h.get_mean_value() / 1e3}


# ----------------------------------------------------------------------------- generator process

class _Driver:
    """This process's share of the load, run on one asyncio loop."""

    def __init__(self, spec: LoadSpec, idx: int, conn: Connection):
        def share(n: int) -> int:
            return n // spec.procs + (idx < n % spec.procs)

        self.spec, self.idx, self.conn = spec, idx, conn
        self.clients, self.qps, self.budget = share(spec.concurrency), spec.qps / spec.procs, share(spec.max_requests)
        self.users = Users(np.load(spec.user_ids, allow_pickle=False), spec.zipf_s, spec.unknown_share,
                           spec.seed, idx)
        self.rng = random.Random(f"{spec.seed}-{idx}")
        self.metadata = (("authorization", f"Bearer {spec.token}"),) if spec.token else None
        self.served: collections.deque[tuple[str, str, list[str]]] = collections.deque(maxlen=256)
        self.hist = {m: new_hist() for m in METHODS}
        self.by_outcome = {k: new_hist() for k in OUTCOMES}   # Recommend only: answered OK / refused
        self.codes: dict[str, collections.Counter[str]] = {m: collections.Counter() for m in METHODS}
        self.lag = new_hist()
        self.stages: dict[str, list[float]] = {}   # name -> [sum ms, sum count_out, n]
        self.server_ms = [0.0, 0]
        self.degraded = 0
        self.sent = 0
        self.start = self.end = self.window_end = 0.0
        self.intervals: dict[int, tuple[HdrHistogram, collections.Counter[str]]] = {}

    async def run(self) -> dict[str, Any]:
        channels, workers = await self._connect()
        self.stubs = [pb2_grpc.RecServeStub(c) for c in channels]
        self.conn.send(("ready", workers))
        t0 = await asyncio.get_running_loop().run_in_executor(None, self.conn.recv)
        self.start = t0 + self.spec.warmup_s
        self.end = self.window_end = self.start + self.spec.duration_s
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        await (self._closed() if self.clients else self._open(t0))
        await asyncio.gather(*(c.close() for c in channels))
        return {"sent": self.sent, "window_s": self.window_end - self.start, "degraded": self.degraded,
                "methods": {m: {"codes": dict(self.codes[m]), "hist": self.hist[m].encode()} for m in METHODS},
                "by_outcome": {k: h.encode() for k, h in self.by_outcome.items()},
                "lag": self.lag.encode(), "stages": self.stages, "server_ms": self.server_ms,
                "connections": len(channels), "workers": workers,
                "intervals": {i: (h.encode(), dict(c)) for i, (h, c) in self.intervals.items()}}

    async def _connect(self) -> tuple[list[grpc.aio.Channel], int]:
        """`channels` connections spread evenly over the server's processes.

        A server whose processes share a port with SO_REUSEPORT (recserve before its gRPC front,
        and similar servers) gets whole connections handed to processes by a hash, so a few
        connections can all land on one and leave the other idle. Open three times as many, ask
        each which process answers (Admin.GetStatus), keep an equal number per process. Against
        the front, which spreads calls itself, this keeps `channels` of them either way. A
        server without Admin (or with a token we lack) keeps the first ones. Returns
        (channels, processes seen).
        """
        want = self.spec.channels
        chans = [grpc.aio.insecure_channel(self.spec.target, options=_OWN_CONNECTION) for _ in range(3 * want)]
        try:
            await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in chans)), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise LoadError(f"cannot connect to {self.spec.target} within {CONNECT_TIMEOUT_S:.0f} s") from None
        try:
            status = await asyncio.gather(*(pb2_grpc.AdminStub(c).GetStatus(
                pb2.GetStatusRequest(), timeout=self.spec.timeout_s, metadata=self.metadata) for c in chans))
        except grpc.aio.AioRpcError:
            keep, workers = chans[:want], 0
        else:
            groups: dict[int, list[grpc.aio.Channel]] = collections.defaultdict(list)
            for c, s in zip(chans, status):
                groups[s.pid].append(c)
            per = min(max(1, want // len(groups)), *(len(g) for g in groups.values()))
            keep, workers = [c for g in groups.values() for c in g[:per]], len(groups)
        await asyncio.gather(*(c.close() for c in chans if c not in keep))
        return keep, workers

    async def _closed(self) -> None:
        async def client(k: int) -> None:
            n = k
            while (t := time.monotonic()) < self.end and self.sent < self.budget:
                await self._one(t, n)
                n += self.clients

        await asyncio.gather(*(client(k) for k in range(self.clients)))

    async def _open(self, t0: float) -> None:
        tasks: set[asyncio.Task] = set()
        t, n = t0, 0
        while True:
            t += self.rng.expovariate(self.qps)
            if t >= self.end or self.sent >= self.budget:
                break
            if (delay := t - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._one(t, n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        await asyncio.gather(*tasks)

    async def _one(self, intended: float, n: int) -> None:
        """One call; counted exactly once if its intended send time lies in the window."""
        measured = self.start <= intended < self.end
        if measured:
            self.sent += 1
            if self.sent == self.budget:
                self.window_end = intended
            if not self.clients:
                self.lag.record_value(max(1, int((time.monotonic() - intended) * 1e6)))
        stub, s = self.stubs[n % len(self.stubs)], self.spec
        user = ""
        if self.served and self.rng.random() < s.event_ratio:
            method, call = "ReportEvents", stub.ReportEvents(self._events(), timeout=s.timeout_s,
                                                             metadata=self.metadata)
        else:
            user = self.users.next()
            req = pb2.RecommendRequest(user_id=user, count=s.count, request_id=f"lt{self.idx}-{n}",
                                       debug=self.rng.random() < s.trace_sample)
            method, call = "Recommend", stub.Recommend(req, timeout=s.timeout_s, metadata=self.metadata)
        code, sent_at = "OK", time.monotonic()
        try:
            resp = await call
        except grpc.aio.AioRpcError as e:
            code = e.code().name
        except Exception as e:  # noqa: BLE001 - a client-side fault is still one counted outcome
            code = f"CLIENT_{type(e).__name__}"
        done = time.monotonic()
        if user and code == "OK":
            if s.event_ratio > 0:
                self.served.append((user, resp.request_id, [it.item_id for it in resp.items]))
            if measured:
                self._note(resp)
        if measured:
            us = max(1, int((done - intended) * 1e6))
            self.codes[method][code] += 1
            self.hist[method].record_value(us)
            if method == "Recommend" and (outcome := OUTCOME_OF.get(code)):
                self.by_outcome[outcome].record_value(us)
                if outcome == "refused":
                    self.by_outcome["refused_from_send"].record_value(max(1, int((done - sent_at) * 1e6)))
            if s.interval_s > 0 and method == "Recommend":
                h, codes = self.intervals.setdefault(int((intended - self.start) // s.interval_s),
                                                     (new_hist(), collections.Counter()))
                h.record_value(us)
                codes[code] += 1

    def _events(self) -> pb2.ReportEventsRequest:
        """Impressions for every item of a just-served list and a click on one of them."""
        user, rid, items = self.served.pop()
        ev = [pb2.Event(kind=pb2.EVENT_KIND_IMPRESSION, user_id=user, item_id=i, request_id=rid) for i in items]
        if items:
            ev.append(pb2.Event(kind=pb2.EVENT_KIND_CLICK, user_id=user, item_id=self.rng.choice(items),
                                request_id=rid))
        return pb2.ReportEventsRequest(events=ev)

    def _note(self, resp: pb2.RecommendResponse) -> None:
        self.degraded += resp.degraded
        self.server_ms[0] += resp.total_ms
        self.server_ms[1] += 1
        for t in resp.trace:
            acc = self.stages.setdefault(t.name, [0.0, 0.0, 0])
            acc[0] += t.ms
            acc[1] += t.count_out
            acc[2] += 1


def generator_main(spec: LoadSpec, idx: int, conn: Connection) -> None:
    """Entry of one generator process: connect, say ready, wait for the start time, run, report."""
    try:
        conn.send(("done", asyncio.run(_Driver(spec, idx, conn).run())))
    except Exception as e:  # noqa: BLE001 - reported to the coordinator as one line
        conn.send(("error", f"generator {idx}: {type(e).__name__}: {e}"))
