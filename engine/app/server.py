"""gRPC server: a supervising parent and N worker processes sharing one port.

One Python process tops out near 3.5k calls/s (the GIL), so `--workers N` spawns N processes
that each build their own Engine and bind the same port with SO_REUSEPORT; the kernel
spreads connections across them. The parent finds the port, waits for every worker to be
ready, prints `recserve serving on HOST:PORT workers=N bundle=VERSION` (engine.app.ready),
serves /metrics (prometheus multiprocess mode, so one scrape sees every worker), restarts a
worker that dies, and on SIGTERM forwards it and exits 0 once every worker drained and exited 0.

What each call does (validation, error mapping, metrics, hot reload through CURRENT) lives
in engine.app.service, shared with the Ray Serve backend (engine.app.ray_app, `--backend ray`).

Feature state (engine.store.embedded): the embedded store's arrays are shared files under /dev/shm,
so an event reported to one worker is seen by all; they persist in a state dir (engine.store.statedir:
an event log fsync'd before each acknowledgement, plus snapshots) unless `--state-dir none`.
`--feature-store redis://...` shares one state between several servers.
"""
from __future__ import annotations

import argparse
import collections
import logging
import multiprocessing as mp
import os
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
from typing import Any

import grpc

from engine.core.bundle import config_file
from engine.core.config import load_config
from engine.core.errors import BundleError, ConfigError
from engine.app.ready import print_ready
from engine.app.service import POLL_S, Service, one_line
from protos import pb2, pb2_grpc

log = logging.getLogger("recserve.server")

RPC_THREADS = 8             # handler threads per worker; the engine parallelises inside a call
STARTUP_TIMEOUT_S = 600.0


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="pipeline TOML (default: the config the bundle carries, of its CURRENT version at start; "
                        "it stays in force across hot reloads)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override with a TOML value, e.g. --set ray.split_fine=true (repeatable)")
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
                   help="embedded (default, in-process), or shared by several servers: redis://HOST:PORT/DB "
                        "or rediscluster://HOST:PORT,...")
    p.add_argument("--state-dir", default=None, metavar="DIR|none",
                   help="embedded store: keep the feature state here (event log written before each "
                        "acknowledgement, snapshots every serving.snapshot_s), reload it at start. Default: "
                        "$RECSERVE_STATE_DIR, else ~/.local/state/recserve/<bundle root>-<hash>; "
                        "'none': memory only (throwaway runs)")
    ray = p.add_argument_group("Ray Serve backend (pip install '.[ray]'; docs/deploy.md)")
    ray.add_argument("--backend", choices=("native", "ray"), default="native",
                     help="native: this machine's worker processes; ray: a Ray Serve application")
    ray.add_argument("--ray-address", default=None,
                     help="Ray cluster to deploy to (e.g. 127.0.0.1:6379 or auto); default: start a local one")
    ray.add_argument("--ray-cpus", type=int, default=0, help="CPUs of the local Ray instance (default: all)")
    ray.add_argument("--replicas", type=int, default=0, help="RecServe replicas (default 1)")
    ray.add_argument("--autoscale", metavar="MIN,MAX", help="autoscale RecServe replicas on ongoing requests")
    ray.add_argument("--proxy-location", choices=("EveryNode", "HeadOnly"), default="EveryNode",
                     help="where Ray runs its gRPC proxy (HeadOnly for several nodes on one host)")


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
    overrides: tuple[str, ...] = ()


class _Fail(Exception):
    """A startup failure reported as one line on stderr, without a traceback."""


def serve(args: argparse.Namespace) -> int:
    """`recserve serve`: returns the process exit code."""
    _setup_logging("")
    if args.config is None:
        try:
            args.config = config_file(args.bundle)
        except BundleError as e:
            print(f"recserve serve: {e}", file=sys.stderr, flush=True)
            return 1
    if args.backend == "ray":
        return _serve_ray(args)
    sup = _Supervisor()
    try:
        return sup.run(args)
    except _Fail as e:
        print(f"recserve serve: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        sup.cleanup()


def _serve_ray(args: argparse.Namespace) -> int:
    try:
        from engine.app import ray_app
    except ImportError as e:
        print(f"recserve serve --backend ray: {e.name or e} is not installed: pip install '.[ray]'",
              file=sys.stderr, flush=True)
        return 1
    try:
        return ray_app.serve_ray(args)
    except ray_app.Fail as e:
        print(f"recserve serve: {e}", file=sys.stderr, flush=True)
        return 1


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
        from engine.store import statedir
        from engine.store.factory import is_embedded, store_factory

        state_dir = statedir.resolve(args.state_dir, args.bundle, is_embedded(args.feature_store))
        try:
            store_factory(args.feature_store, state_dir=state_dir)   # checks the URL and combination
            if state_dir:
                self.state_claim = statedir.StateDirClaim(state_dir, self.store_dir)
        except (ValueError, OSError, statedir.StateDirBusy) as e:
            raise _Fail(str(e)) from None
        self.opts = _Opts(args.config, args.bundle, args.host, port, tls, args.token, args.grace, self.store_dir,
                          args.feature_store, state_dir, tuple(args.set))
        if args.metrics_port is not None:
            # must be set before any worker imports prometheus_client
            self.metrics_dir = tempfile.mkdtemp(prefix="recserve-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
            _start_metrics_http(args.host, args.metrics_port)
        self.children = [self._spawn(i, fallback="") for i in range(self.n)]
        version = self._wait_ready()
        self.hold.close()
        print_ready(_addr(self.host, self.opts.port), workers=self.n, bundle=version)
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
        conn.send(("error", one_line(e)))
        sys.exit(1)
    conn.send(("ready", w.svc.reloader.current, w.svc.engine.bundle_version))
    conn.close()
    parent = os.getppid()
    while not stop.wait(POLL_S):
        w.svc.tick()
        if os.getppid() != parent:
            log.error("parent process died; stopping")
            break
    w.stop(opts.grace)


class _Worker:
    """One Service behind one gRPC server bound with SO_REUSEPORT."""

    def __init__(self, idx: int, opts: _Opts, fallback: str):
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from engine.store.factory import store_factory

        cfg = load_config(opts.config, opts.overrides)
        s = cfg.serving   # worker 0 writes the periodic snapshots of the shared arrays
        self.svc = Service(cfg, opts.bundle, store_factory(
            opts.feature_store, opts.store_dir, opts.state_dir, s.snapshot_s, idx == 0, s.event_buffer),
            opts.token, idx, fallback)
        self.server = grpc.server(ThreadPoolExecutor(RPC_THREADS, thread_name_prefix="rpc"),
                                  options=[("grpc.so_reuseport", 1)],
                                  maximum_concurrent_rpcs=s.max_inflight)
        pb2_grpc.add_RecServeServicer_to_server(self.svc.rpcs, self.server)
        pb2_grpc.add_AdminServicer_to_server(self.svc.admin, self.server)
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

    def stop(self, grace: float) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.svc.close()
        log.info("worker %d drained and stopped", self.svc.idx)
