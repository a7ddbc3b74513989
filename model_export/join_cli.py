"""`recserve join`: run the label join once over what is logged, or follow the log."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

IDLE_S = 0.2     # pause when the log has nothing new
RETRY_S = 1.0    # following: pause before resuming from the last commit when the log failed


def add_join_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="TOML config: its [join] and [log] sections")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override with a TOML value, e.g. --set join.window_s=600 (repeatable)")
    p.add_argument("--log", default=None, metavar="DIR|redis://...",
                   help="the sample log: a log folder or Redis streams (default: log.dir or log.redis_url)")
    p.add_argument("--out", required=True, type=Path, help="output folder of joined samples (and its offsets)")
    p.add_argument("--follow", action="store_true", help="keep joining as the log grows, until SIGTERM/SIGINT")
    p.add_argument("--group", default="joiner", help="Redis consumer group (default joiner)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve prometheus /metrics here (127.0.0.1)")


def run_join(args: argparse.Namespace) -> int:
    from engine.core.config import load_config
    from engine.store.samplelog.backends import open_reader
    from model_export.join import Joiner
    from model_export.joined import JoinedWriter

    cfg = load_config(args.config, args.set)
    spec = args.log or (cfg.log.redis_url if cfg.log.backend == "redis" else cfg.log.dir)
    if not spec:
        print("recserve join: name the sample log with --log DIR|redis://... (the config sets neither "
              "log.dir nor log.redis_url)", file=sys.stderr)
        return 2
    if not spec.startswith(("redis://", "rediss://", "unix://")) and not Path(spec, "impressions").is_dir():
        print(f"recserve join: {spec}: no sample log there (expected {spec}/impressions/)", file=sys.stderr)
        return 2
    gauges = _metrics(args.metrics_port) if args.metrics_port is not None else None
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    print(f"join: {spec} -> {args.out} (window {cfg.join.window_s:g} s, late {cfg.join.late_s:g} s)", flush=True)
    consumer = f"{args.group}-1"
    while True:
        try:
            out = JoinedWriter(args.out, int(cfg.join.segment_mb * 2**20))
        except RuntimeError as e:
            print(f"recserve join: {e}", file=sys.stderr)
            return 1
        readers = []
        try:
            readers = [open_reader(spec, stream, args.group, consumer) for stream in ("impressions", "events")]
            joiner = Joiner(cfg.join, *readers, out)       # resumes from the last commit
            _follow(joiner, args.follow, stop, gauges)
        except Exception as e:
            # The log is unreachable (Redis restarting) or unreadable. A step cut short is never
            # committed: the output is closed as it was at the last commit and, following, the
            # joiner starts again from that commit (its cursors, its state) once the log answers.
            out.close()
            for r in readers:
                r.close()
            if not args.follow or stop.is_set():
                raise
            print(f"join: {type(e).__name__}: {e}; resuming from the last commit in {RETRY_S:g} s", file=sys.stderr,
                  flush=True)
            if stop.wait(RETRY_S):
                return 1
            continue
        joiner.commit()
        _report(joiner, gauges)
        out.close()
        for r in readers:
            r.close()
        return 0


def _follow(joiner, follow: bool, stop: threading.Event, gauges) -> None:
    commits = joiner.stats.commits
    while not stop.is_set():
        at_end = joiner.step()
        if joiner.stats.commits != commits:
            commits = joiner.stats.commits
            _report(joiner, gauges)
        if at_end:
            if not follow:
                break
            stop.wait(IDLE_S)


def _report(joiner, gauges) -> None:
    print(f"join {time.strftime('%H:%M:%S')}: {joiner.stats.line()} pending {len(joiner.open)}", flush=True)
    if gauges:
        counters, rates = gauges
        for k, v in joiner.counters().items():
            counters.labels(k).set(v)
        for k, v in joiner.stats.rates().items():
            rates.labels(k).set(v)


def _metrics(port: int):
    from prometheus_client import Gauge, start_http_server

    start_http_server(port, addr="127.0.0.1")
    return (Gauge("recserve_join", "label join counters (cumulative over restarts)", ["counter"]),
            Gauge("recserve_join_rate", "join_rate, positive_rate, event_join_rate", ["rate"]))
