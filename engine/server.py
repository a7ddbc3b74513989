"""gRPC server: a supervising parent and N worker processes sharing one port.

One Python process tops out near 3.5k calls/s (the GIL), so `--workers N` spawns N processes
that each build their own Engine and bind the same port with SO_REUSEPORT; the kernel
spreads connections across them. The parent finds the port, waits for every worker to be
ready, prints `recserve serving on HOST:PORT workers=N bundle=VERSION`, serves /metrics
(prometheus multiprocess mode, so one scrape sees every worker), restarts a worker that
dies, and on SIGTERM forwards it and exits 0 once every worker drained and exited 0.

Hot reload: every worker polls the bundle root's CURRENT pointer each second and swaps a
new version in through `Engine.swap_bundle`. A version that fails to load is logged,
counted and remembered, and the old one keeps serving. `Admin.ReloadBundle` reaches one
worker only: it loads the requested version there first and, only if that worked, writes
CURRENT, which every other worker picks up on its next poll (≤ 1 s). CURRENT stays the one
source of truth, so a restarted worker or server serves what the others serve.

Feature state (engine.store): the embedded store's arrays are shared files under /dev/shm,
so an event reported to one worker is seen by all; `--state-dir` persists them across
restarts. `--feature-store redis://...` shares one state between several servers.
"""
from __future__ import annotations

import argparse
import collections
import hmac
import logging
import multiprocessing as mp
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait as mp_wait
from pathlib import Path
from typing import Any, Callable

import grpc

from engine.config import ConfigError, load_config
from engine.request import EVENT_KINDS, DeadlineExceeded, Event, InvalidRequest, Overloaded, Request
from protos import pb2, pb2_grpc

log = logging.getLogger("recserve.server")

RPC_THREADS = 8             # handler threads per worker; the engine parallelises inside a call
POLL_S = 1.0                # CURRENT poll, RSS gauge and orphan check period
DEADLINE_MARGIN_MS = 2.0    # left of the client's deadline for serialising the answer
STARTUP_TIMEOUT_S = 600.0

_LATENCY_BUCKETS = (.001, .002, .004, .006, .008, .01, .015, .02, .03, .05, .075, .1, .15, .25, .5, 1.0)
_STAGE_BUCKETS = (.0001, .00025, .0005, .001, .002, .004, .008, .015, .03, .06, .1, .25)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="pipeline TOML")
    p.add_argument("--bundle", required=True, type=Path,
                   help="bundle root holding CURRENT (hot-reloaded) or one version folder (fixed)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=50051, help="0: pick a free port, shown in the ready line")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes sharing the port (default: serving.workers of the config)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve prometheus /metrics here")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain; with --tls-key enables TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument("--token", default=os.environ.get("RECSERVE_TOKEN") or None,
                   help="bearer token required on ReportEvents and Admin (default: $RECSERVE_TOKEN)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on SIGTERM")
    p.add_argument("--feature-store", default="embedded", metavar="URL",
                   help="embedded (default, in-process) or redis://HOST:PORT/DB shared by several servers")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="embedded store: snapshot the feature state here every serving.snapshot_s and at "
                        "shutdown, reload it at start (default: no persistence)")


@dataclass(frozen=True)
class _Opts:
    """What a worker needs; picklable for the spawn start method."""
    config: Path
    bundle: Path
    host: str
    port: int
    tls: tuple[bytes, bytes] | None   # (key, cert) PEM
    token: str | None
    grace: float
    store_dir: str          # the embedded feature store's shared arrays: every worker sees every event
    feature_store: str = "embedded"
    state_dir: str | None = None


class _Fail(Exception):
    """A startup failure reported as one line on stderr, without a traceback."""


def serve(args: argparse.Namespace) -> int:
    """`recserve serve`: returns the process exit code."""
    _setup_logging("")
    sup = _Supervisor()
    try:
        return sup.run(args)
    except _Fail as e:
        print(f"recserve serve: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        sup.cleanup()


# ----------------------------------------------------------------------------- parent

@dataclass
class _Child:
    idx: int
    proc: Any                 # multiprocessing SpawnProcess
    conn: Connection
    started: float
    bundle: str = ""          # version folder it serves, once ready


class _Supervisor:
    def __init__(self):
        self.stop = threading.Event()
        self.hold: socket.socket | None = None
        self.metrics_dir: str | None = None
        self.store_dir: str | None = None
        self.children: list[_Child] = []
        self.restart_at: dict[int, float] = {}
        self.backoff: dict[int, float] = collections.defaultdict(lambda: 1.0)
        self.ctx = mp.get_context("spawn")

    def run(self, args: argparse.Namespace) -> int:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda *_: self.stop.set())
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            raise _Fail(str(e)) from None
        if not args.bundle.is_dir():
            raise _Fail(f"{args.bundle}: no such bundle directory")
        if bool(args.tls_cert) != bool(args.tls_key):
            raise _Fail("--tls-cert and --tls-key go together")
        try:
            tls = (args.tls_key.read_bytes(), args.tls_cert.read_bytes()) if args.tls_cert else None
        except OSError as e:
            raise _Fail(f"{e.filename}: {e.strerror}") from None
        self.n = args.workers or cfg.serving.workers
        if self.n < 1:
            raise _Fail(f"--workers must be >= 1, got {self.n}")
        self.host = args.host
        port, self.hold = _claim_port(args.host, args.port)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.store_dir = tempfile.mkdtemp(prefix="recserve-store-", dir=shm)
        from engine.store import store_factory

        try:
            store_factory(args.feature_store, state_dir=args.state_dir)   # checks the URL and combination
        except ValueError as e:
            raise _Fail(str(e)) from None
        self.opts = _Opts(args.config, args.bundle, args.host, port, tls, args.token, args.grace, self.store_dir,
                          args.feature_store, str(args.state_dir) if args.state_dir else None)
        if args.metrics_port is not None:
            # must be set before any worker imports prometheus_client
            self.metrics_dir = tempfile.mkdtemp(prefix="recserve-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
            _start_metrics_http(args.host, args.metrics_port)
        self.children = [self._spawn(i, fallback="") for i in range(self.n)]
        version = self._wait_ready()
        self.hold.close()
        print(f"recserve serving on {_addr(self.host, self.opts.port)} workers={self.n} bundle={version}",
              flush=True)
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

    def _spawn(self, idx: int, fallback: str) -> _Child:
        rx, tx = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=_worker_main, args=(idx, self.opts, fallback, tx),
                             name=f"recserve-worker-{idx}")
        p.start()
        tx.close()
        return _Child(idx, p, rx, time.monotonic())

    def _wait_ready(self) -> str:
        """Block until every worker answered; the first failure stops the server."""
        version, pending = "", list(self.children)
        end = time.monotonic() + STARTUP_TIMEOUT_S
        while pending:
            if self.stop.is_set():
                raise _Fail("interrupted during startup")
            if time.monotonic() > end:
                raise _Fail(f"workers not ready after {STARTUP_TIMEOUT_S:.0f} s")
            mp_wait([c.conn for c in pending if not c.conn.closed] + [c.proc.sentinel for c in pending],
                    timeout=0.5)
            for c in list(pending):
                msg = _recv(c)
                if msg and msg[0] == "error":
                    raise _Fail(msg[1])
                if msg:
                    _, c.bundle, version = msg
                    pending.remove(c)
                elif c.proc.exitcode is not None:
                    raise _Fail(f"worker {c.idx} exited with code {c.proc.exitcode} during startup")
        return version

    def _supervise(self) -> None:
        """Restart dead workers with exponential backoff until SIGTERM/SIGINT."""
        while not self.stop.is_set():
            waitables = ([c.proc.sentinel for c in self.children if c.proc.exitcode is None]
                         + [c.conn for c in self.children if not c.conn.closed])
            if waitables:
                mp_wait(waitables, timeout=0.5)
            else:
                self.stop.wait(0.5)
            now = time.monotonic()
            for i, c in enumerate(self.children):
                msg = _recv(c)
                if msg and msg[0] == "error":
                    log.error("worker %d failed to start: %s", c.idx, msg[1])
                elif msg:
                    c.bundle = msg[1]
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
        log.info("stopping: draining in-flight calls (grace %.0f s)", self.opts.grace)
        for c in self.children:
            if c.proc.is_alive():
                os.kill(c.proc.pid, signal.SIGTERM)
        end = time.monotonic() + self.opts.grace + 15
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


def _claim_port(host: str, port: int) -> tuple[int, socket.socket]:
    """Resolve port 0 and refuse a port already in use, then hold it until workers bind.

    The probe binds without SO_REUSEPORT, so another SO_REUSEPORT server on the port (which
    the kernel would otherwise silently share traffic with) is detected.
    """
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise _Fail(f"--host {host}: {e.strerror}") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as e:
            raise _Fail(f"cannot bind {_addr(host, port)}: {e.strerror}") from None
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
        raise _Fail(f"--metrics-port {port}: {e.strerror}") from None


def _mark_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def _setup_logging(tag: str) -> None:
    """Our INFO lines, only warnings from libraries (faiss logs its loader at INFO)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s recserve[%(process)d{tag}] %(name)s: %(message)s")
    logging.getLogger("recserve").setLevel(logging.INFO)


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ----------------------------------------------------------------------------- worker

def _worker_main(idx: int, opts: _Opts, fallback: str, conn: Connection) -> None:
    """Entry of one worker process: build the engine, serve, poll CURRENT, drain on SIGTERM."""
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    _setup_logging(f" w{idx}")
    try:
        w = _Worker(idx, opts, fallback)
    except Exception as e:    # noqa: BLE001 - reported as the server's one-line startup error
        conn.send(("error", _one_line(e)))
        sys.exit(1)
    conn.send(("ready", w.reloader.current, w.engine.bundle_version))
    conn.close()
    parent = os.getppid()
    while not stop.wait(POLL_S):
        w.tick()
        if os.getppid() != parent:
            log.error("parent process died; stopping")
            break
    w.stop(opts.grace)


def _one_line(e: BaseException) -> str:
    """The message of our own errors (they name the culprit), else type and first line."""
    text = (str(e).strip().splitlines() or [""])[0]
    return text if type(e).__name__ in ("BundleError", "ConfigError") else f"{type(e).__name__}: {text}"


class _Worker:
    """One Engine behind one gRPC server bound with SO_REUSEPORT."""

    def __init__(self, idx: int, opts: _Opts, fallback: str):
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from engine.engine import Engine
        from engine.store import store_factory

        self.idx, self.opts, self.started = idx, opts, time.monotonic()
        self.cfg = load_config(opts.config)
        self.metrics = _Metrics()
        self.counters: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        root, name, bundle, refused = _initial_bundle(opts.bundle, fallback)
        s = self.cfg.serving   # worker 0 writes the periodic snapshots of the shared arrays
        self.engine = Engine(self.cfg, bundle, make_store=store_factory(
            opts.feature_store, opts.store_dir, opts.state_dir, s.snapshot_s, idx == 0, s.event_buffer))
        self.reloader = _Reloader(root, name, self)
        self.reloader.refused |= refused
        self.metrics.bundle.labels(self.engine.bundle_version).set(1)
        self.server = grpc.server(ThreadPoolExecutor(RPC_THREADS, thread_name_prefix="rpc"),
                                  options=[("grpc.so_reuseport", 1)],
                                  maximum_concurrent_rpcs=self.cfg.serving.max_inflight)
        pb2_grpc.add_RecServeServicer_to_server(_RecServe(self), self.server)
        pb2_grpc.add_AdminServicer_to_server(_Admin(self), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        services = [pb2.DESCRIPTOR.services_by_name[s].full_name for s in ("RecServe", "Admin")]
        reflection.enable_server_reflection(
            [*services, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        addr = _addr(opts.host, opts.port)
        try:
            bound = (self.server.add_secure_port(addr, grpc.ssl_server_credentials([opts.tls]))
                     if opts.tls else self.server.add_insecure_port(addr))
        except RuntimeError:
            bound = 0
        if not bound:
            raise OSError(f"cannot bind {addr}")
        self.server.start()
        for s in ("", *services):
            self.health.set(s, health_pb2.HealthCheckResponse.SERVING)
        self.tick()

    def tick(self) -> None:
        self.reloader.poll()
        rss = _rss_bytes()
        self.metrics.rss.set(rss)
        for k, v in self.engine.store.stats().items():
            self.metrics.store.labels(k).set(v)
        with self.lock:
            self.counters["rss_bytes"] = rss

    def stop(self, grace: float) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.engine.close()
        log.info("worker %d drained and stopped", self.idx)

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters[key] += n

    def call(self, method: str, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        """Run one RPC: error mapping, metrics and counters in one place."""
        t0 = time.perf_counter()
        self.count("inflight")
        try:
            result, code, msg = fn(), grpc.StatusCode.OK, ""
        except _Abort as e:
            result, code, msg = None, e.code, e.msg
        except InvalidRequest as e:
            result, code, msg = None, grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except Overloaded as e:
            result, code, msg = None, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e) or "overloaded"
        except DeadlineExceeded as e:
            result, code, msg = None, grpc.StatusCode.DEADLINE_EXCEEDED, str(e) or "deadline exceeded"
        except Exception as e:    # noqa: BLE001 - a bug answers INTERNAL, it never kills the worker
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

    def check_token(self, context: grpc.ServicerContext) -> None:
        if self.opts.token is None:
            return
        got = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.opts.token}".encode()):
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")


class _Abort(Exception):
    """Refuse a call with this status from inside a handler."""

    def __init__(self, code: grpc.StatusCode, msg: str):
        super().__init__(msg)
        self.code, self.msg = code, msg


def _initial_bundle(path: Path, fallback: str) -> tuple[Path | None, str, Any, set[str]]:
    """(root, version folder, bundle, refused versions): CURRENT of a bundle root, or the
    fallback version the other workers serve if CURRENT is broken; or a plain version
    folder, which is then never reloaded."""
    from engine.bundle import BundleError, load_bundle

    pointer = path / "CURRENT"
    if not pointer.exists():
        return None, path.name, load_bundle(path), set()
    name = pointer.read_text().strip()
    try:
        return path, name, load_bundle(path / name), set()
    except BundleError as e:
        if not fallback or fallback == name:
            raise
        log.error("bundle %s refused (%s); serving %s like the other workers", name, e, fallback)
        return path, fallback, load_bundle(path / fallback), {name}


class _Reloader:
    """Follows CURRENT; remembers refused versions so a bad one is not retried every poll."""

    def __init__(self, root: Path | None, current: str, worker: _Worker):
        self.root, self.current, self.w = root, current, worker
        self.refused: set[str] = set()
        self.lock = threading.Lock()

    def poll(self) -> None:
        name = self._pointer()
        if name and name != self.current and name not in self.refused:
            self._swap(name)

    def reload(self, path: str | None) -> tuple[bool, str]:
        """Admin.ReloadBundle: load `path` (a version folder of the root: its name or absolute
        path) here, then publish it in CURRENT for the other workers; without a path, re-read
        CURRENT now, retrying a version refused before."""
        if self.root is None:
            return False, "started on a version folder, not a bundle root with CURRENT: nothing to reload"
        name = self._pointer() if path is None else self._version_name(path)
        if name is None:
            return False, (f"{self.root}/CURRENT is missing or empty" if path is None
                           else f"{path}: not a version folder inside {self.root}")
        self.refused.discard(name)
        ok, msg = self._swap(name)
        if ok and path is not None and self._pointer() != name:
            try:
                _write_atomic(self.root / "CURRENT", name + "\n")
            except OSError as e:
                return False, f"serving {name} on this worker only: cannot write CURRENT: {e}"
            msg += "; CURRENT updated, other workers follow within ~1 s"
        return ok, msg

    def _pointer(self) -> str | None:
        if self.root is None:
            return None
        try:
            return (self.root / "CURRENT").read_text().strip() or None
        except OSError:
            return None

    def _version_name(self, path: str) -> str | None:
        p = (self.root / path).resolve()     # an absolute path replaces the root
        return p.name if p.parent == self.root.resolve() and p.is_dir() else None

    def _swap(self, name: str) -> tuple[bool, str]:
        from engine.bundle import BundleError, load_bundle

        with self.lock:
            if name == self.current:
                return True, f"already serving {name}"
            old_version = self.w.engine.bundle_version
            try:
                self.w.engine.swap_bundle(load_bundle(self.root / name))
            except Exception as e:    # noqa: BLE001 - whatever breaks, the old bundle keeps serving
                if not isinstance(e, BundleError):
                    log.exception("loading bundle %s failed", name)
                self.refused.add(name)
                self.w.metrics.reloads.labels("refused").inc()
                self.w.count("reloads_refused")
                msg = f"reload of {name} failed: {_one_line(e)}; still serving {old_version}"
                log.error(msg)
                return False, msg
            self.current = name
            new = self.w.engine.bundle_version
            self.w.metrics.bundle.labels(old_version).set(0)
            self.w.metrics.bundle.labels(new).set(1)
            self.w.metrics.reloads.labels("ok").inc()
            self.w.count("reloads_ok")
            return True, f"serving {new}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:               # not Linux: peak RSS is the best portable figure
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Metrics:
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


# ----------------------------------------------------------------------------- services

_KINDS = {v: n.removeprefix("EVENT_KIND_").lower() for n, v in pb2.EventKind.items()
          if n.removeprefix("EVENT_KIND_").lower() in EVENT_KINDS}


class _RecServe(pb2_grpc.RecServeServicer):
    def __init__(self, w: _Worker):
        self.w = w

    def Recommend(self, request, context):
        return self.w.call("Recommend", context, lambda: self._recommend(request, context))

    def ReportEvents(self, request, context):
        return self.w.call("ReportEvents", context, lambda: self._report(request, context))

    def _recommend(self, m: pb2.RecommendRequest, context: grpc.ServicerContext) -> pb2.RecommendResponse:
        s, cfg = self.w.cfg.serving, self.w.cfg
        if not m.user_id:
            raise InvalidRequest("user_id", "must not be empty")
        if not 0 <= m.count <= s.max_count:
            raise InvalidRequest("count", f"{m.count} is outside 0..{s.max_count} (0: default {s.default_count})")
        if len(m.exclude_item_ids) > s.max_excludes:
            raise InvalidRequest("exclude_item_ids",
                                 f"{len(m.exclude_item_ids)} ids exceed serving.max_excludes={s.max_excludes}")
        if m.experiment and m.experiment not in cfg.experiments:
            known = ", ".join(sorted(cfg.experiments)) or "none configured"
            raise InvalidRequest("experiment", f"unknown experiment '{m.experiment}' (known: {known})")
        deadline_ms = 0.0
        remaining = context.time_remaining()
        if remaining is not None and remaining < 1e6:   # no client deadline reads as ~forever
            deadline_ms = remaining * 1000 - DEADLINE_MARGIN_MS
            if deadline_ms <= 0:
                raise DeadlineExceeded("the client's deadline leaves no time to serve")
        resp = self.w.engine.recommend(Request(
            user_id=m.user_id, count=m.count or s.default_count, context=dict(m.context),
            exclude=list(m.exclude_item_ids), experiment=m.experiment, debug=m.debug,
            deadline_ms=deadline_ms, request_id=m.request_id))
        self.w.metrics.observe(resp)
        return self._to_proto(resp, m.debug)

    @staticmethod
    def _to_proto(r: Any, debug: bool) -> pb2.RecommendResponse:
        scores = r.scores.tolist()
        tasks = {t: v.tolist() for t, v in r.task_scores.items()}
        items = [pb2.Item(item_id=item, score=scores[k], predictions={t: v[k] for t, v in tasks.items()},
                          routes=r.routes[k])
                 for k, item in enumerate(r.item_ids)]
        trace = [pb2.StageTrace(name=t.name, ms=t.ms, count_in=t.count_in, count_out=t.count_out,
                                status=t.status) for t in r.trace] if debug else []
        return pb2.RecommendResponse(items=items, degraded=r.degraded, experiment=r.experiment,
                                     bundle_version=r.bundle_version, request_id=r.request_id,
                                     trace=trace, total_ms=r.total_ms)

    def _report(self, m: pb2.ReportEventsRequest, context: grpc.ServicerContext) -> pb2.ReportEventsResponse:
        self.w.check_token(context)
        events, index, rejected = [], [], []
        for i, e in enumerate(m.events):
            kind = _KINDS.get(e.kind)
            if kind is None:
                rejected.append((i, f"kind: unknown event kind {e.kind}"))
                continue
            events.append(Event(kind=kind, user_id=e.user_id, item_id=e.item_id, timestamp=e.timestamp,
                                request_id=e.request_id))
            index.append(i)
        accepted, engine_rejected = self.w.engine.report_events(events) if events else (0, [])
        rejected += [(index[j], reason) for j, reason in engine_rejected]
        rejected.sort()
        self.w.metrics.events.labels("accepted").inc(accepted)
        self.w.metrics.events.labels("rejected").inc(len(rejected))
        self.w.count("events_accepted", accepted)
        self.w.count("events_rejected", len(rejected))
        return pb2.ReportEventsResponse(
            accepted=accepted, rejected=[pb2.RejectedEvent(index=i, reason=r) for i, r in rejected])


class _Admin(pb2_grpc.AdminServicer):
    def __init__(self, w: _Worker):
        self.w = w

    def ReloadBundle(self, request, context):
        def run():
            self.w.check_token(context)
            ok, msg = self.w.reloader.reload(request.path if request.HasField("path") else None)
            return pb2.ReloadBundleResponse(ok=ok, version=self.w.engine.bundle_version, message=msg)
        return self.w.call("ReloadBundle", context, run)

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
