"""The gRPC front: owns the port and every connection, queues calls, hands each to an idle worker.

Why a front instead of workers sharing the port (SO_REUSEPORT): the kernel balances
connections, not calls, and HTTP/2 multiplexes every call of a client on one connection, so
a client with one channel kept one worker busy and the other idle, and calls that landed on
a busy worker queued behind it (or shared its interpreter lock) while another core idled.
Here one asyncio process accepts every call, keeps one FIFO queue, and gives the next call
to a free worker process (a Recommend to the one freed last, whose caches are warm): one
queue in front of N single-flight servers, so a call waits only when every worker is busy,
and a worker runs one request at a time with no interpreter lock to share. Calls that
mostly wait on I/O (ReportEvents, engine.app.calls.IO_SLOTS) have their own queue and go to
a worker's side threads, up to IO_SLOTS per worker. The front never parses a request (it
forwards the bytes), so it costs a fraction of a millisecond of CPU per call; it also
answers grpc.health.v1 and reflection, and refuses at once what admission control turns
away (engine.app.admission).

The front runs on its own event loop in a thread of the supervising process
(engine.app.supervisor), which attaches each worker's pipe once the worker is ready. A
worker that exits mid-call costs that call UNAVAILABLE; the supervisor restarts it.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.app.admission import Admission
from engine.app.calls import IO_SLOTS, METHODS, SERVICES, Answer, Call

log = logging.getLogger("recserve.front")

_QUEUE_BUCKETS = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5)


@dataclass(eq=False)
class _Pending:
    call: Call
    future: asyncio.Future


@dataclass(eq=False)
class _Worker:
    idx: int
    conn: Connection
    busy: _Pending | None = None    # its one CPU-bound call
    io: dict[int, _Pending] = field(default_factory=dict)   # `io` calls on its side threads, by id


@dataclass
class FrontOptions:
    address: str                        # host:port to bind
    tls: tuple[bytes, bytes] | None     # (key, cert) PEM
    max_queue_ms: float
    inflight_per_worker: int
    queue_burst_ms: float = 0.0
    deadline_ms: float = float("inf")


class Front:
    """Lives on one event loop; every method but the thread-safe wrappers of FrontThread runs on it."""

    def __init__(self, opts: FrontOptions):
        self.opts = opts
        self.workers: dict[int, _Worker] = {}
        self.idle: collections.deque[_Worker] = collections.deque()
        self.queue: collections.deque[_Pending] = collections.deque()      # CPU-bound calls
        self.io_queue: collections.deque[_Pending] = collections.deque()   # `io` calls (ReportEvents)
        self.inflight = 0
        self.ids = itertools.count()
        self.admission = Admission(0, opts.max_queue_ms, opts.inflight_per_worker, opts.queue_burst_ms)
        self.metrics = _FrontMetrics()

    async def start(self) -> None:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        handlers: dict[str, dict[str, grpc.RpcMethodHandler]] = collections.defaultdict(dict)
        for i, m in enumerate(METHODS):
            handlers[m.service][m.name] = grpc.unary_unary_rpc_method_handler(self._handler(i))
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(s, h) for s, h in handlers.items()])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        a = self.opts.address
        try:
            bound = (self.server.add_secure_port(a, grpc.ssl_server_credentials([self.opts.tls]))
                     if self.opts.tls else self.server.add_insecure_port(a))
        except RuntimeError:
            bound = 0
        if not bound:
            raise OSError(f"cannot bind {a}")
        await self.server.start()
        for s in ("", *SERVICES):
            await self.health.set(s, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        """Refuse new calls (UNAVAILABLE), let queued and running ones finish within `grace` s."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    # -- workers ---------------------------------------------------------------------
    def attach(self, idx: int, conn: Connection) -> None:
        if (old := self.workers.get(idx)) is not None:     # its exit not seen yet: it is gone all the same
            self._detach(old, "replaced")
        w = _Worker(idx, conn)
        self.workers[idx] = w
        self.admission.workers = len(self.workers)
        asyncio.get_running_loop().add_reader(conn.fileno(), self._on_answer, w)
        self.idle.append(w)
        self._dispatch()

    def _detach(self, w: _Worker, why: str) -> None:
        if self.workers.get(w.idx) is not w:
            return
        del self.workers[w.idx]
        self.admission.workers = len(self.workers)
        asyncio.get_running_loop().remove_reader(w.conn.fileno())
        w.conn.close()
        if w in self.idle:
            self.idle.remove(w)
        failed = ([w.busy] if w.busy else []) + list(w.io.values())
        if not self.workers:             # nobody left to serve the queues until a restart
            failed += [*self.queue, *self.io_queue]
            self.queue.clear()
            self.io_queue.clear()
        for p in failed:
            _settle(p, Answer(p.call.id, grpc.StatusCode.UNAVAILABLE, f"worker {w.idx} {why}; retry"))
        log.warning("worker %d detached (%s); %d attached", w.idx, why, len(self.workers))

    def _on_answer(self, w: _Worker) -> None:
        try:
            data = w.conn.recv_bytes()
        except (EOFError, OSError):
            self._detach(w, "exited mid-call" if w.busy or w.io else "exited")
            return
        try:
            answer = Answer.decode(data)
        except Exception as e:   # noqa: BLE001 - a worker that garbles answers is not trusted with more
            log.error("worker %d sent an unreadable answer: %s", w.idx, e)
            self._detach(w, "sent an unreadable answer")
            return
        if w.busy is not None and w.busy.call.id == answer.id:
            p, w.busy = w.busy, None
            if METHODS[p.call.method].admitted:   # Admin calls (a reload takes seconds) teach it nothing
                self.admission.observe(answer.work_ms)
            self.idle.append(w)
        else:
            p = w.io.pop(answer.id, None)
        if p is not None:
            _settle(p, answer)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            p = self.queue.popleft()
            if p.future.done():              # the client gave up while it queued
                continue
            # A Recommend goes to the worker freed last: at low load the same process serves call after
            # call with the models and tables the last one touched still in its core's caches. Admin
            # calls go to any idle one, so that GetStatus and reloads reach every worker.
            k = len(self.idle) - 1 if METHODS[p.call.method].admitted else random.randrange(len(self.idle))
            w = self.idle[k]
            del self.idle[k]
            w.busy = p
            self._send(w, p)
        while self.io_queue and self.workers:
            w = min(self.workers.values(), key=lambda x: len(x.io))
            if len(w.io) >= IO_SLOTS:
                break
            p = self.io_queue.popleft()
            if not p.future.done():
                w.io[p.call.id] = p
                self._send(w, p)

    def _send(self, w: _Worker, p: _Pending) -> None:
        self.metrics.queued.observe(time.monotonic() - p.call.arrived)
        try:
            w.conn.send_bytes(p.call.encode())
        except OSError:                  # died between answers: the call goes back, the worker away
            if w.busy is p:
                w.busy = None
                self.queue.appendleft(p)
            else:
                del w.io[p.call.id]
                self.io_queue.appendleft(p)
            self._detach(w, "exited")

    # -- calls -----------------------------------------------------------------------
    def _handler(self, method: int):
        m = METHODS[method]

        async def call(payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
            arrived = time.monotonic()
            if not self.workers:
                return await self._refuse(context, m.name, grpc.StatusCode.UNAVAILABLE, "no worker ready; retry")
            remaining = context.time_remaining()
            budget = self.opts.deadline_ms if remaining is None else min(self.opts.deadline_ms, remaining * 1000)
            if m.admitted and (why := self.admission.refusal(len(self.queue), len(self.idle), self.inflight, m.io,
                                                             arrived, budget)):
                return await self._refuse(context, m.name, grpc.StatusCode.RESOURCE_EXHAUSTED, why)
            auth = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")
            p = _Pending(Call(next(self.ids), method, arrived,
                              remaining if remaining is not None and remaining < 1e6 else None, auth, payload),
                         asyncio.get_running_loop().create_future())
            self.inflight += 1
            try:
                (self.io_queue if m.io else self.queue).append(p)
                self._dispatch()
                answer = await p.future
            finally:
                self.inflight -= 1
                if not p.future.done():      # cancelled by the client: leave no orphan in the queue
                    p.future.cancel()
            if answer.code is not grpc.StatusCode.OK:
                await context.abort(answer.code, answer.message)
            return answer.payload

        return call

    async def _refuse(self, context, method: str, code: grpc.StatusCode, why: str) -> bytes:
        self.metrics.refused.labels(method, code.name).inc()
        await context.abort(code, why)
        return b""   # not reached: abort raises


def _settle(p: _Pending, a: Answer) -> None:
    if not p.future.done():
        p.future.set_result(a)


class _FrontMetrics:
    def __init__(self):
        from prometheus_client import Counter, Histogram

        # the same series the workers count answered calls in: a scrape sums both
        self.refused = Counter("recserve_requests", "RPCs by method and status code", ["method", "code"])
        self.queued = Histogram("recserve_queue_seconds", "wait of an accepted call for a free worker",
                                buckets=_QUEUE_BUCKETS)


class FrontThread:
    """A Front on its own event loop in a daemon thread; its methods are safe from any thread."""

    def __init__(self, opts: FrontOptions):
        self.loop = asyncio.new_event_loop()
        self.front = Front(opts)
        self.thread = threading.Thread(target=self.loop.run_forever, name="front", daemon=True)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.front.start(), self.loop).result()

    def attach(self, idx: int, conn: Connection) -> None:
        self.loop.call_soon_threadsafe(self.front.attach, idx, conn)

    def stop(self, grace: float) -> None:
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.front.stop(grace), self.loop).result()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
