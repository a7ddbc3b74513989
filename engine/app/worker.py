"""A worker process: one Engine (in one Service) answering the front's calls one at a time.

Single flight is the point: a request never shares this interpreter's lock with another, so
its latency is its own CPU time, and the front's one queue decides who waits. Calls that
mostly wait on I/O (ReportEvents: the event log's fsync before the answer) run on a few
side threads instead, so a slow disk never holds the worker's CPU slot. For the same
reason the routes' periodic rebuilds (hot list, cold-start pool) run between calls here,
not on threads of their own (engine.core.refresh.between_calls). Between calls (and at
least every POLL_S) the worker also follows CURRENT for hot reloads and updates its gauges;
while a new version loads (seconds on the 1M bundle), the one call the front hands this
worker waits for it (its budget counts, so it gets a degraded answer) and the other workers
serve the rest. It stops when the front closes its pipe (the supervisor's drain), on SIGTERM after
the call in hand, or when its parent dies. Ctrl-C reaches the whole process group: workers
ignore SIGINT and let the supervisor drain them.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import grpc

from engine.app.calls import IO_SLOTS, METHODS, Answer, Call
from engine.app.reloader import one_line
from engine.app.service import POLL_S, Service
from engine.core import refresh
from engine.core.config import Config, load_config

log = logging.getLogger("recserve.server")


@dataclass(frozen=True)
class WorkerOptions:
    """What a worker needs; picklable for the spawn start method."""
    config: Path
    bundle: Path
    token: str | None
    store_dir: str          # the embedded feature store's shared arrays: every worker sees every event
    feature_store: str = "embedded"
    state_dir: str | None = None
    overrides: tuple[str, ...] = ()


class CallContext:
    """The part of grpc.ServicerContext engine.app.service uses, for a call relayed by the front."""

    def __init__(self, call: Call):
        self.call = call

    def time_remaining(self) -> float | None:
        """The client's remaining time now (None: no client deadline)."""
        c = self.call
        return None if c.remaining is None else c.remaining - (time.monotonic() - c.arrived)

    def waited_s(self) -> float:
        """Time since the call arrived at the front: its queueing counts against the server's budget."""
        return time.monotonic() - self.call.arrived

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", self.call.auth)] if self.call.auth else []

    def abort(self, code: grpc.StatusCode, msg: str) -> None:
        raise _Aborted(code, msg)


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, msg: str):
        super().__init__(msg)
        self.code, self.msg = code, msg


def worker_main(idx: int, opts: WorkerOptions, fallback: str, conn: Connection) -> None:
    """Entry of one worker process: build the engine, say ready, answer calls until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    setup_logging(f" w{idx}")
    schedule = refresh.between_calls()    # before the engine exists: its routes register here
    try:
        cfg = load_config(opts.config, opts.overrides)
        _yield_to_front(cfg.serving.worker_nice)
        svc = _service(idx, opts, cfg, fallback)
    except Exception as e:    # noqa: BLE001 - reported as the server's one-line startup error
        conn.send(("error", one_line(e)))
        sys.exit(1)
    gc.freeze()   # what the engine loaded stays out of later collections (a full one: 16 ms on the 1M bundle)
    conn.send(("ready", svc.reloader.current, svc.engine.bundle_version))
    try:
        _serve(conn, svc, stop, schedule)
    finally:
        svc.close()
    log.info("worker %d stopped", idx)


def setup_logging(tag: str) -> None:
    """Our INFO lines, only warnings from libraries (faiss logs its loader at INFO); `tag` names the process."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s recserve[%(process)d{tag}] %(name)s: %(message)s")
    logging.getLogger("recserve").setLevel(logging.INFO)


def _yield_to_front(nice: int) -> None:
    """Lower this process's CPU priority by `nice`, so when the engines fill every core the front's
    admission, refusals and pipe hops still run at once. Linux keeps a niceness per thread and a
    new thread inherits its creator's: every thread already here is set, later ones follow."""
    if not os.path.isdir("/proc/self/task"):     # not Linux: the niceness is the process's
        os.nice(nice)
        return
    base = os.getpriority(os.PRIO_PROCESS, 0)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), min(base + nice, 19))
        except (ProcessLookupError, PermissionError):   # a thread that ended meanwhile
            pass


def _service(idx: int, opts: WorkerOptions, cfg: Config, fallback: str) -> Service:
    from engine.app.arms import board_for
    from engine.store.factory import store_factory

    s = cfg.serving   # worker 0 writes the periodic snapshots of the shared arrays
    return Service(cfg, opts.bundle, store_factory(
        opts.feature_store, opts.store_dir, opts.state_dir, s.snapshot_s, idx == 0, s.event_buffer),
        opts.token, idx, fallback, board=board_for(opts.feature_store, opts.store_dir))


def _serve(conn: Connection, svc: Service, stop: threading.Event, schedule: refresh.Schedule) -> None:
    """Answer calls: CPU-bound ones here one at a time, `io` ones (ReportEvents, which waits for
    the event log's fsync) on IO_SLOTS side threads; in the gaps, the stages' due refreshes
    (engine.core.refresh) and the tick."""
    servicers = {"RecServe": svc.rpcs, "Admin": svc.admin}
    handlers = [getattr(servicers[m.service.rsplit(".", 1)[1]], m.name) for m in METHODS]
    lock = threading.Lock()          # one answer at a time on the pipe

    def reply(a: Answer) -> None:
        with lock:
            conn.send_bytes(a.encode())

    parent, next_tick = os.getppid(), time.monotonic() + POLL_S
    with ThreadPoolExecutor(IO_SLOTS, thread_name_prefix="io") as side:
        while not stop.is_set():
            if conn.poll(max(0.0, min(next_tick, schedule.next_due()) - time.monotonic())):
                try:
                    data = conn.recv_bytes()
                except (EOFError, OSError):      # the front closed the pipe: drained, stop
                    return
                try:
                    call = Call.decode(data)
                    io = METHODS[call.method].io
                except Exception as e:   # noqa: BLE001 - a garbled call is dropped, the worker goes on
                    log.error("unreadable call from the front: %s", e)
                    continue
                if io:
                    side.submit(lambda c=call: reply(_answer(handlers, c)))
                    continue
                reply(_answer(handlers, call))
                schedule.run_due(overdue_only=True)   # busy without a gap: still never twice as stale
            else:
                schedule.run_due()
            if time.monotonic() >= next_tick:
                svc.tick()
                next_tick = time.monotonic() + POLL_S
                if os.getppid() != parent:
                    log.error("parent process died; stopping")
                    return


def _answer(handlers: list, call: Call) -> Answer:
    m, t0 = METHODS[call.method], time.perf_counter()
    try:
        request = m.request.FromString(call.payload)
    except Exception as e:   # noqa: BLE001 - what gRPC's own deserializer failure would answer
        return Answer(call.id, grpc.StatusCode.INTERNAL, f"cannot parse {m.request.__name__}: {e}")
    try:
        body, code, msg = handlers[call.method](request, CallContext(call)).SerializeToString(), grpc.StatusCode.OK, ""
    except _Aborted as a:
        body, code, msg = b"", a.code, a.msg
    return Answer(call.id, code, msg, body, (time.perf_counter() - t0) * 1e3)
