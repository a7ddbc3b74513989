"""The supervising process of the native server: workers, the front, restarts, drain.

It claims the port, spawns `--workers` worker processes (engine.app.worker: one Engine
each, one call at a time), waits until every one is ready, starts the gRPC front
(engine.app.front: the port, the one queue, admission) and hands it each worker's pipe,
prints `recserve serving on HOST:PORT workers=N bundle=VERSION` (engine.app.ready), serves
/metrics (prometheus multiprocess mode, so one scrape sees the front and every worker),
restarts a worker that dies (exponential backoff), and on SIGTERM/SIGINT stops the front
(new calls refused, accepted ones finish within --grace), closes the workers' pipes and
exits 0 once every worker exited 0.
"""
from __future__ import annotations

import argparse
import collections
import gc
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait as mp_wait
from typing import Any

from engine.app.front import FrontOptions, FrontThread
from engine.app.ready import print_ready
from engine.app.worker import WorkerOptions, worker_main
from engine.core.config import load_config
from engine.core.errors import ConfigError

log = logging.getLogger("recserve.server")

STARTUP_TIMEOUT_S = 600.0


class Fail(Exception):
    """A startup failure reported as one line on stderr, without a traceback."""


@dataclass
class _Child:
    idx: int
    proc: Any                 # multiprocessing SpawnProcess
    conn: Connection          # ready message, then the front's calls
    started: float
    bundle: str = ""          # version folder it serves, once ready
    attached: bool = False    # its pipe belongs to the front


class Supervisor:
    def __init__(self):
        self.stop = threading.Event()
        self.hold: socket.socket | None = None
        self.front: FrontThread | None = None
        self.metrics_dir: str | None = None
        self.store_dir: str | None = None
        self.state_claim = None   # engine.store.statedir.StateDirClaim: this server owns its state dir
        self.children: list[_Child] = []
        self.restart_at: dict[int, float] = {}
        self.backoff: dict[int, float] = collections.defaultdict(lambda: 1.0)
        self.ctx = mp.get_context("spawn")

    def run(self, args: argparse.Namespace) -> int:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda *_: self.stop.set())
        try:
            cfg = load_config(args.config, args.set)
        except ConfigError as e:
            raise Fail(str(e)) from None
        if not args.bundle.is_dir():
            raise Fail(f"{args.bundle}: no such bundle directory")
        if bool(args.tls_cert) != bool(args.tls_key):
            raise Fail("--tls-cert and --tls-key go together")
        try:
            tls = (args.tls_key.read_bytes(), args.tls_cert.read_bytes()) if args.tls_cert else None
        except OSError as e:
            raise Fail(f"{e.filename}: {e.strerror}") from None
        self.n = args.workers or cfg.serving.workers
        if self.n < 1:
            raise Fail(f"--workers must be >= 1, got {self.n}")
        self.grace = args.grace
        port, self.hold = claim_port(args.host, args.port)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.store_dir = tempfile.mkdtemp(prefix="recserve-store-", dir=shm)
        from engine.store import statedir
        from engine.store.factory import is_embedded, store_factory

        state_dir = statedir.resolve(args.state_dir, args.bundle, is_embedded(args.feature_store))
        try:
            store_factory(args.feature_store, state_dir=state_dir)   # checks the URL and combination
            if state_dir:
                self.state_claim = statedir.StateDirClaim(state_dir, self.store_dir)
        except (ValueError, OSError, statedir.StateDirBusy) as e:
            raise Fail(str(e)) from None
        self.opts = WorkerOptions(args.config, args.bundle, args.token, self.store_dir, args.feature_store,
                                  state_dir, tuple(args.set))
        if args.metrics_port is not None:
            # must be set before this process or any worker imports prometheus_client
            self.metrics_dir = tempfile.mkdtemp(prefix="recserve-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
            _start_metrics_http(args.host, args.metrics_port)
        self.children = [self._spawn(i, fallback="") for i in range(self.n)]
        version = self._wait_ready()
        addr = addr_text(args.host, port)
        sv = cfg.serving
        self.front = FrontThread(FrontOptions(addr, tls, sv.max_queue_ms, sv.max_inflight, sv.queue_burst_ms,
                                              sv.deadline_ms))
        try:
            self.front.start()
        except OSError as e:
            raise Fail(str(e)) from None
        self.hold.close()
        for c in self.children:
            self._attach(c)
        # the front shares this interpreter: a full collection over the ~80k objects of start-up
        # held its loop ~50 ms under load (queueing a burst of arrivals past admission); frozen,
        # later collections scan only what calls leave behind
        gc.freeze()
        print_ready(addr, workers=self.n, bundle=version)
        log.info("%d worker(s) ready, pids %s", self.n, [c.proc.pid for c in self.children])
        self._supervise()
        return self._shutdown()

    def cleanup(self) -> None:
        for c in self.children:       # only left alive when startup failed
            if c.proc.is_alive():
                c.proc.kill()
        if self.hold:
            self.hold.close()
        for d in (self.metrics_dir, self.store_dir):
            if d:
                shutil.rmtree(d, ignore_errors=True)
        if self.state_claim:
            self.state_claim.release()

    def _spawn(self, idx: int, fallback: str) -> _Child:
        here, there = self.ctx.Pipe(duplex=True)
        p = self.ctx.Process(target=worker_main, args=(idx, self.opts, fallback, there),
                             name=f"recserve-worker-{idx}")
        p.start()
        there.close()
        return _Child(idx, p, here, time.monotonic())

    def _attach(self, c: _Child) -> None:
        c.attached = True
        self.front.attach(c.idx, c.conn)

    def _wait_ready(self) -> str:
        """Block until every worker answered; the first failure stops the server."""
        version, pending = "", list(self.children)
        end = time.monotonic() + STARTUP_TIMEOUT_S
        while pending:
            if self.stop.is_set():
                raise Fail("interrupted during startup")
            if time.monotonic() > end:
                raise Fail(f"workers not ready after {STARTUP_TIMEOUT_S:.0f} s")
            mp_wait([c.conn for c in pending if not c.conn.closed] + [c.proc.sentinel for c in pending],
                    timeout=0.5)
            for c in list(pending):
                msg = _recv(c)
                if msg and msg[0] == "error":
                    raise Fail(msg[1])
                if msg:
                    _, c.bundle, version = msg
                    pending.remove(c)
                elif c.proc.exitcode is not None:
                    raise Fail(f"worker {c.idx} exited with code {c.proc.exitcode} during startup")
        return version

    def _supervise(self) -> None:
        """Restart dead workers with exponential backoff until SIGTERM/SIGINT."""
        while not self.stop.is_set():
            waitables = ([c.proc.sentinel for c in self.children if c.proc.exitcode is None]
                         + [c.conn for c in self.children if not c.attached and not c.conn.closed])
            if waitables:
                mp_wait(waitables, timeout=0.5)
            else:
                self.stop.wait(0.5)
            now = time.monotonic()
            for i, c in enumerate(self.children):
                msg = None if c.attached else _recv(c)
                if msg and msg[0] == "error":
                    log.error("worker %d failed to start: %s", c.idx, msg[1])
                elif msg:
                    c.bundle = msg[1]
                    self._attach(c)
                    log.info("worker %d (pid %d) ready, bundle %s", c.idx, c.proc.pid, msg[2])
                if c.proc.exitcode is None or self.stop.is_set():
                    continue
                if i not in self.restart_at:
                    _mark_dead(c.proc.pid)
                    if now - c.started > 60:
                        self.backoff[i] = 1.0
                    self.restart_at[i] = now + self.backoff[i]
                    log.error("worker %d (pid %d) exited with code %s; restarting in %.0f s",
                              c.idx, c.proc.pid, c.proc.exitcode, self.backoff[i])
                    self.backoff[i] = min(self.backoff[i] * 2, 60.0)
                elif now >= self.restart_at[i]:
                    del self.restart_at[i]
                    good = next((o.bundle for o in self.children if o.bundle and o.proc.exitcode is None), "")
                    self.children[i] = self._spawn(i, fallback=good)

    def _shutdown(self) -> int:
        log.info("stopping: draining accepted calls (grace %.0f s)", self.grace)
        self.front.stop(self.grace)
        for c in self.children:       # EOF on its pipe: the worker closes its engine and exits
            if not c.attached and c.proc.is_alive():
                os.kill(c.proc.pid, signal.SIGTERM)      # still starting: it stops once it could serve
            c.conn.close()
        end = time.monotonic() + 15
        codes = []
        for c in self.children:
            c.proc.join(max(0.0, end - time.monotonic()))
            if c.proc.is_alive():
                log.error("worker %d did not stop in time; killing it", c.idx)
                c.proc.kill()
                c.proc.join()
            codes.append(c.proc.exitcode)
            _mark_dead(c.proc.pid)
        return 0 if all(code == 0 for code in codes) else 1


def _recv(c: _Child) -> tuple | None:
    try:
        return c.conn.recv() if not c.conn.closed and c.conn.poll() else None
    except EOFError:          # the worker exited; its pipe is done
        c.conn.close()
        return None


def claim_port(host: str, port: int) -> tuple[int, socket.socket]:
    """Resolve port 0 and refuse a port already in use, then hold it until the front binds.

    The probe binds without SO_REUSEPORT, so another SO_REUSEPORT server on the port (which
    the kernel would otherwise silently share traffic with) is detected.
    """
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise Fail(f"--host {host}: {e.strerror}") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as e:
            raise Fail(f"cannot bind {addr_text(host, port)}: {e.strerror}") from None
        port = probe.getsockname()[1]
    hold = socket.socket(family, socket.SOCK_STREAM)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    hold.bind((sockaddr[0], port, *sockaddr[2:]))
    return port, hold


def _start_metrics_http(host: str, port: int) -> None:
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise Fail(f"--metrics-port {port}: {e.strerror}") from None


def _mark_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def addr_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
