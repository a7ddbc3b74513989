"""What a recserve RPC does, whatever carries it: one Engine with validation, error mapping,
metrics, counters, hot reload and the proto conversions.

Two transports use it: a worker process behind the gRPC front (engine.app.worker) and a Ray Serve replica behind
Ray's gRPC proxy (engine.app.ray_app). A transport hands each call a context with
`time_remaining()`, `invocation_metadata()` and `abort(code, message)`, the subset of
grpc.ServicerContext used here, plus `waited_s()`: how long the call queued before it was
picked up (it counts against serving.deadline_ms); and calls `tick()` about once a second.

Hot reload: `tick()` polls the bundle root's CURRENT pointer and swaps a new version in
through `Engine.swap_bundle`. A version that fails to load is logged, counted and
remembered, and the old one keeps serving. `Admin.ReloadBundle` reaches one process only:
it loads the requested version there first and, only if that worked, writes CURRENT, which
every other process picks up on its next poll (<= 1 s). CURRENT stays the one source of
truth, so a restarted worker or replica serves what the others serve. A refused reload is a
non-OK status with the reason (INVALID_ARGUMENT: the path names no version folder;
FAILED_PRECONDITION: the version does not load), so clients and scripts can tell.
"""
from __future__ import annotations

import collections
import hmac
import logging
import os
import resource
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import grpc

from engine.app import arms as arms_board
from engine.app.metrics import Metrics
from engine.app.reloader import Abort, Reloader, initial_bundle
from engine.app.samplelog import SampleLog, log_dir, new_request_id
from engine.core.config import Config
from engine.core.request import EVENT_KINDS, Event, Request
from engine.core.errors import DeadlineExceeded, InvalidRequest, Overloaded
from protos import pb2, pb2_grpc

log = logging.getLogger("recserve.server")

POLL_S = 1.0                # CURRENT poll and RSS gauge period
DEADLINE_MARGIN_MS = 2.0    # left of the client's deadline for serialising the answer
MIN_BUDGET_MS = 0.001       # a call whose budget the queue ate: no time for anything skippable



class Service:
    """One Engine and the RPCs over it (`rpcs`: RecServe, `admin`: Admin servicers)."""

    def __init__(self, cfg: Config, bundle: Path, make_store: Callable, token: str | None = None,
                 worker_id: int = 0, fallback: str = "", remote_models: dict | None = None,
                 board: arms_board.Board | None = None):
        """`bundle`: a bundle root holding CURRENT (followed) or one version folder (fixed);
        `fallback`: the version other processes serve, used if CURRENT names a broken one;
        `remote_models`: see Engine; `board`: where the experiment arms are shared
        (engine.app.arms; default: this process only)."""
        from engine.core.runner import Engine

        self.idx, self.token, self.started = worker_id, token, time.monotonic()
        self.served_by = f"{socket.gethostname()}/{os.getpid()}"
        self.cfg = cfg
        self.metrics = Metrics()
        self.counters: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        root, name, first, refused = initial_bundle(bundle, fallback)
        self.engine = Engine(cfg, first, make_store=make_store, remote_models=remote_models)
        self.reloader = Reloader(root, name, self)
        self.reloader.refused |= refused
        self.metrics.bundle.labels(self.engine.bundle_version).set(1)
        self.samples = _sample_log(cfg, bundle, worker_id, self.engine)
        self.arms = arms_board.Follower(self.engine, cfg, board or arms_board.MemoryBoard())
        self.rpcs, self.admin = RecServeRPCs(self), AdminRPCs(self)
        self.tick()

    def tick(self) -> None:
        self.reloader.poll()
        self.arms.poll()
        rss = _rss_bytes()
        self.metrics.rss.set(rss)
        for k, v in self.engine.store.stats().items():
            self.metrics.store.labels(k).set(v)
        logged = self.samples.stats() if self.samples else {}
        with self.lock:
            self.counters["rss_bytes"] = rss
            self.counters.update({f"samplelog.{k}": v for k, v in logged.items()})

    def close(self) -> None:
        self.engine.close()
        self.arms.board.close()
        if self.samples:
            self.samples.close()

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters[key] += n

    def call(self, method: str, context: Any, fn: Callable[[], Any]) -> Any:
        """Run one RPC: error mapping, metrics and counters in one place."""
        t0 = time.perf_counter()
        self.count("inflight")
        try:
            result, code, msg = fn(), grpc.StatusCode.OK, ""
        except Abort as e:
            result, code, msg = None, e.code, e.msg
        except InvalidRequest as e:
            result, code, msg = None, grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except Overloaded as e:
            result, code, msg = None, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e) or "overloaded"
        except DeadlineExceeded as e:
            result, code, msg = None, grpc.StatusCode.DEADLINE_EXCEEDED, str(e) or "deadline exceeded"
        except Exception as e:    # noqa: BLE001 - a bug answers INTERNAL, it never kills the process
            log.exception("%s failed", method)
            result, code, msg = None, grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"
        self.metrics.requests.labels(method, code.name).inc()
        self.metrics.latency.labels(method).observe(time.perf_counter() - t0)
        with self.lock:
            self.counters["inflight"] -= 1
            self.counters[f"rpc.{method}.{code.name}"] += 1
        if code is not grpc.StatusCode.OK:
            context.abort(code, msg)
        return result

    def deadline_ms(self, context: Any) -> float:
        """What is left of the call's budget: serving.deadline_ms from its arrival (the time it
        queued for a worker counts), or the client's deadline if that is sooner. If the queue ate
        the server's budget while the client still waits: DeadlineExceeded under on_deadline =
        "error", else a minimal budget, so only guards and inline routes run (a degraded answer)."""
        s = self.cfg.serving
        waited_ms = context.waited_s() * 1000
        remaining = context.time_remaining()
        client = remaining * 1000 - DEADLINE_MARGIN_MS if remaining is not None and remaining < 1e6 else float("inf")
        if client > 0 and waited_ms >= s.deadline_ms:
            if s.on_deadline == "error":
                raise DeadlineExceeded(f"waited {waited_ms:.0f} ms for a worker, past serving.deadline_ms "
                                       f"{s.deadline_ms:g}")
            return MIN_BUDGET_MS
        return min(s.deadline_ms - waited_ms, client)   # <= 0 only when the client's deadline passed

    def check_token(self, context: Any) -> None:
        if self.token is None:
            return
        got = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
            raise Abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")


def _sample_log(cfg: Config, bundle: Path, worker_id: int, engine: Any):
    """The sample log hook (engine.app.samplelog): None when `log.backend = "off"`, or files
    without a folder (a memory-only run); a log that cannot be opened stops the start."""
    folder = log_dir(cfg.log, bundle) if cfg.log.backend == "files" else None
    if cfg.log.backend == "off" or (cfg.log.backend == "files" and folder is None):
        return None
    try:
        return SampleLog(cfg.log, folder, worker_id)
    except Exception:
        engine.close()
        raise


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:               # not Linux: peak RSS is the best portable figure
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- services

_KINDS = {v: n.removeprefix("EVENT_KIND_").lower() for n, v in pb2.EventKind.items()
          if n.removeprefix("EVENT_KIND_").lower() in EVENT_KINDS}


class RecServeRPCs(pb2_grpc.RecServeServicer):
    def __init__(self, w: Service):
        self.w = w

    def Recommend(self, request, context):
        return self.w.call("Recommend", context, lambda: self._recommend(request, context))

    def ReportEvents(self, request, context):
        return self.w.call("ReportEvents", context, lambda: self._report(request, context))

    def _recommend(self, m: pb2.RecommendRequest, context: grpc.ServicerContext) -> pb2.RecommendResponse:
        """Converts the proto and the deadline into a Request; the engine validates it."""
        resp = self.w.engine.recommend(Request(
            user_id=m.user_id, count=m.count, context=dict(m.context), exclude_item_ids=list(m.exclude_item_ids),
            experiment=m.experiment, debug=m.debug, deadline_ms=self.w.deadline_ms(context),
            request_id=m.request_id))
        self.w.metrics.observe(resp)
        if not resp.request_id:       # created after the engine ran: stages seeded by it see what they saw before
            resp.request_id = new_request_id()
        if self.w.samples:            # to the kernel before the answer leaves (engine.app.samplelog)
            self.w.samples.recommend(m.user_id, dict(m.context), resp)
        return self._to_proto(resp, m.debug, self.w.served_by)

    @staticmethod
    def _to_proto(r: Any, debug: bool, served_by: str) -> pb2.RecommendResponse:
        scores = r.scores.tolist()
        tasks = {t: v.tolist() for t, v in r.task_scores.items()}
        items = [pb2.Item(item_id=item, score=scores[k], predictions={t: v[k] for t, v in tasks.items()},
                          routes=r.routes[k])
                 for k, item in enumerate(r.item_ids)]
        trace = [pb2.StageTrace(name=t.name, ms=t.ms, count_in=t.count_in, count_out=t.count_out,
                                status=t.status) for t in r.trace] if debug else []
        return pb2.RecommendResponse(items=items, degraded=r.degraded, experiment=r.experiment,
                                     bundle_version=r.bundle_version, request_id=r.request_id,
                                     trace=trace, total_ms=r.total_ms, served_by=served_by)

    def _report(self, m: pb2.ReportEventsRequest, context: grpc.ServicerContext) -> pb2.ReportEventsResponse:
        """Converts the events; the engine validates each one (a kind outside EVENT_KINDS keeps
        its proto name, or its number if it has none, so the rejection names it)."""
        self.w.check_token(context)

        def kind(v: int) -> str:
            if v in _KINDS:
                return _KINDS[v]
            return pb2.EventKind.Name(v) if v in pb2.EventKind.values() else str(v)

        events = [Event(kind=kind(e.kind), user_id=e.user_id, item_id=e.item_id, timestamp=e.timestamp,
                        request_id=e.request_id) for e in m.events]
        accepted, rejected = self.w.engine.report_events(events) if events else (0, [])
        if self.w.samples and accepted:   # the joiner's copy, before the acknowledgement
            self.w.samples.events(events, {i for i, _ in rejected})
        self.w.metrics.events.labels("accepted").inc(accepted)
        self.w.metrics.events.labels("rejected").inc(len(rejected))
        self.w.count("events_accepted", accepted)
        self.w.count("events_rejected", len(rejected))
        return pb2.ReportEventsResponse(
            accepted=accepted, rejected=[pb2.RejectedEvent(index=i, reason=r) for i, r in rejected])


class AdminRPCs(pb2_grpc.AdminServicer):
    def __init__(self, w: Service):
        self.w = w

    def ReloadBundle(self, request, context):
        def run():
            self.w.check_token(context)
            msg = self.w.reloader.reload(request.path if request.HasField("path") else None)
            return pb2.ReloadBundleResponse(ok=True, version=self.w.engine.bundle_version, message=msg)
        return self.w.call("ReloadBundle", context, run)

    def SetArms(self, request, context):
        def run():
            self.w.check_token(context)
            code, msg, answer = arms_board.handle_set(self.w.arms, request, self.w.idx)
            if code is not None:
                raise Abort(code, msg)
            self.w.count("arms_set")
            return answer
        return self.w.call("SetArms", context, run)

    def GetArms(self, request, context):
        def run():
            self.w.check_token(context)
            return arms_board.to_proto(self.w.arms.arms, arms_board.describe(self.w.arms.arms), self.w.idx)
        return self.w.call("GetArms", context, run)

    def GetStatus(self, request, context):
        def run():
            self.w.check_token(context)
            with self.w.lock:
                counters = dict(self.w.counters)
            return pb2.GetStatusResponse(
                bundle_version=self.w.engine.bundle_version, uptime_s=time.monotonic() - self.w.started,
                worker_id=self.w.idx, pid=os.getpid(),
                counters={**counters, **{f"store.{k}": v for k, v in self.w.engine.store.stats().items()}})
        return self.w.call("GetStatus", context, run)

