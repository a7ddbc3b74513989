"""`recserve serve`: the command line of the native gRPC server, and the door to the Ray backend.

The native server is three kinds of process (docs/architecture.md, "Serving processes"):
- the supervisor (engine.app.supervisor): port, worker start and restarts, /metrics, drain;
- the gRPC front (engine.app.front), a thread of the supervisor: every connection and call,
  one queue, admission control (engine.app.admission), each call to an idle worker;
- `--workers N` worker processes (engine.app.worker): one Engine each, one call at a time.

What each call does (validation, error mapping, metrics, hot reload through CURRENT) lives
in engine.app.service, shared with the Ray Serve backend (engine.app.ray_app, `--backend ray`).

Feature state (engine.store.embedded): the embedded store's arrays are shared files under /dev/shm,
so an event reported to one worker is seen by all; they persist in a state dir (engine.store.statedir:
an event log fsync'd before each acknowledgement, plus snapshots) unless `--state-dir none`.
`--feature-store redis://...` shares one state between several servers.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine.app.supervisor import Fail, Supervisor
from engine.app.worker import setup_logging
from engine.core.bundle import config_file
from engine.core.errors import BundleError


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
                   help="worker processes, one request at a time each, behind the front (default: serving.workers)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve prometheus /metrics here")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain; with --tls-key enables TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument("--token", default=os.environ.get("RECSERVE_TOKEN") or None,
                   help="bearer token required on ReportEvents and Admin (default: $RECSERVE_TOKEN)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds accepted calls get to finish on SIGTERM")
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


def serve(args: argparse.Namespace) -> int:
    """`recserve serve`: returns the process exit code."""
    setup_logging("")
    if args.config is None:
        try:
            args.config = config_file(args.bundle)
        except BundleError as e:
            print(f"recserve serve: {e}", file=sys.stderr, flush=True)
            return 1
    if args.backend == "ray":
        return _serve_ray(args)
    sup = Supervisor()
    try:
        return sup.run(args)
    except Fail as e:
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
