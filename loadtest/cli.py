"""`recserve loadtest` / `python -m loadtest`: closed loop, open loop, SLO sweep, or the demo's short run.

Without --target it starts `recserve serve` on loopback from --config/--bundle (with a metrics
port, so the report gets per-stage times from every request and the server's CPU and RSS).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest import soak
from loadtest.coordinator import run_load
from loadtest.generator import LoadError, LoadSpec
from loadtest.report import codes_text, headline, load_label, summary_lines, sweep_ratio, write_report
from loadtest.target import Server, metrics_url


@dataclass(frozen=True)
class Target:
    name: str
    address: str
    metrics_url: str | None = None
    pid: int | None = None          # server process (with its children) for CPU and RSS


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def add_loadtest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", choices=("closed", "open", "sweep", "soak", "demo"),
                   help="closed: C clients back to back; open: Poisson arrivals at --qps; sweep: raise the open-"
                        "loop QPS until p99 passes --slo-ms or errors appear; soak: one long open-loop level at "
                        "--qps, reported per --interval (loadtest/soak.py); demo: 10 s at C=4, 5-line summary")
    t = p.add_argument_group("target")
    t.add_argument("--bundle", required=True, type=Path,
                   help="bundle root or version folder: the user ids to draw from (and what a started server serves)")
    t.add_argument("--target", help="host:port of a running server (default: start one on loopback from --config)")
    t.add_argument("--config", type=Path, help="pipeline TOML of the server started here")
    t.add_argument("--workers", type=int, default=0, help="workers of the server started here (0: the config's)")
    t.add_argument("--server-log", type=Path, help="stderr of the server started here (default: this stderr)")
    t.add_argument("--metrics-url", help="prometheus endpoint of --target (host:port or URL): per-stage times")
    t.add_argument("--server-pid", type=int, help="pid of --target's server: CPU and RSS of it and its children")
    t.add_argument("--token", default=os.environ.get("RECSERVE_TOKEN") or None,
                   help="bearer token for ReportEvents and Admin.GetStatus (default $RECSERVE_TOKEN)")
    t.add_argument("--baseline", action="store_true",
                   help="also start the untuned baseline (loadtest/baseline.py: same models, same proto) from "
                        "--config/--bundle, load it the same way and report it alongside")
    t.add_argument("--baseline-target", help="host:port of a second server loaded the same way and reported alongside")
    t.add_argument("--baseline-metrics-url", help="prometheus endpoint of the baseline")
    t.add_argument("--baseline-pid", type=int, help="pid of the baseline server")
    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=_ints, default=[4], help="closed loop clients; a list (1,4,16) runs each")
    g.add_argument("--qps", type=_floats, default=[100.0], help="open loop offered QPS; a list runs each")
    g.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    g.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (excluded)")
    g.add_argument("--max-requests", type=int, default=100_000, help="measured requests per level at most")
    g.add_argument("--zipf", type=float, default=1.1, help="exponent of user popularity")
    g.add_argument("--unknown-share", type=float, default=0.05, help="share of requests from never-seen users")
    g.add_argument("--event-ratio", type=float, default=0.0,
                   help="share of calls that are ReportEvents (impressions + a click) for a just-served list")
    g.add_argument("--trace-sample", type=float, default=0.02, help="share of requests sent with debug traces")
    g.add_argument("--count", type=int, default=0, help="items per request (0: the server's default)")
    g.add_argument("--timeout", type=float, default=5.0, help="per-call deadline, seconds")
    g.add_argument("--procs", type=int, default=1, help="generator processes")
    g.add_argument("--channels", type=int, default=8, help="TCP connections per generator process")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--interval", type=float, default=60.0, help="soak: seconds per reported interval")
    s = p.add_argument_group("sweep")
    s.add_argument("--slo-ms", type=float, default=50.0, help="p99 latency objective")
    s.add_argument("--qps-start", type=float, default=50.0)
    s.add_argument("--qps-step", type=float, default=50.0)
    s.add_argument("--qps-max", type=float, default=5000.0)
    p.add_argument("--out", type=Path, help="report folder (default reports/loadtest-MODE-TIMESTAMP)")


def run_loadtest(args: argparse.Namespace) -> int:
    """Entry of `recserve loadtest`; returns the exit code."""
    if not args.target and not args.config:
        print("recserve loadtest: give --target HOST:PORT or --config (to start a server here)", file=sys.stderr)
        return 2
    if args.baseline and not args.config:
        print("recserve loadtest: --baseline needs --config (the baseline serves the same pipeline)", file=sys.stderr)
        return 2
    try:
        with contextlib.ExitStack() as stack:
            if args.target:
                main = Target("recserve", args.target, args.metrics_url and metrics_url(args.metrics_url),
                              args.server_pid)
            else:
                srv = stack.enter_context(Server(args.config, args.bundle, args.workers, args.server_log))
                print(f"started server {srv.target} workers={srv.workers} bundle={srv.version}", file=sys.stderr)
                main = Target("recserve", srv.target, srv.metrics_url, srv.pid)
            if args.mode == "demo":
                demo_summary(main.address, args.bundle, args.duration, args.concurrency[0], main.metrics_url,
                             main.pid, args.token)
                return 0
            targets = [main]
            if args.baseline:
                from loadtest.baseline import BaselineServer

                base = stack.enter_context(BaselineServer(args.config, args.bundle))
                print(f"started baseline {base.target}", file=sys.stderr)
                targets.append(Target("baseline", base.target, None, base.pid))
            elif args.baseline_target:
                targets.append(Target("baseline", args.baseline_target,
                                      args.baseline_metrics_url and metrics_url(args.baseline_metrics_url),
                                      args.baseline_pid))
            report = {"meta": _meta(args), "targets": [run_target(t, args) for t in targets]}
    except (LoadError, RuntimeError, OSError, ValueError) as e:
        print(f"recserve loadtest: {e}", file=sys.stderr)
        return 1
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = write_report(report, args.out or Path("reports") / f"loadtest-{args.mode}-{stamp}")
    for t in report["targets"]:
        print("\n".join(summary_lines(headline(t), t["target"])))
        for r in t["runs"]:
            if r.get("intervals"):
                print("\n".join(soak.markdown(r)[:3]))
        if sweep := t.get("sweep"):
            print(f"highest sustainable QPS (p99 <= {sweep['slo_ms']:g} ms): {sweep['max_sustainable_qps']}; "
                  f"stopped: {sweep['stopped']}")
    if ratio := sweep_ratio(report):
        print(ratio)
    print("report: " + "  ".join(str(p) for p in paths.values()))
    return 0


def _spec(args: argparse.Namespace, address: str, **level: Any) -> LoadSpec:
    return LoadSpec(target=address, user_ids=user_ids_path(args.bundle), **level, duration_s=args.duration,
                    warmup_s=args.warmup, max_requests=args.max_requests, zipf_s=args.zipf,
                    unknown_share=args.unknown_share, event_ratio=args.event_ratio, trace_sample=args.trace_sample,
                    count=args.count, timeout_s=args.timeout, token=args.token, procs=args.procs,
                    channels=args.channels, seed=args.seed)


def user_ids_path(bundle: str | Path) -> str:
    from engine.core.bundle import resolve

    return str(resolve(bundle) / "tables" / "user_ids.npy")


def run_target(t: Target, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"name": t.name, "target": t.address, "runs": []}

    def run(**level: Any) -> dict[str, Any]:
        r = run_load(_spec(args, t.address, **level), t.pid, t.metrics_url)
        out["runs"].append(r)
        print(f"{t.name} {load_label(r)}: {r['achieved_qps']:.1f} QPS ok, p50 {r['latency_ms']['p50']:.2f} "
              f"p99 {r['latency_ms']['p99']:.2f} ms, errors {r['sent'] - r['ok']}", file=sys.stderr)
        return r

    if args.mode == "closed":
        for c in args.concurrency:
            run(concurrency=c)
    elif args.mode == "open":
        for q in args.qps:
            run(qps=q)
    elif args.mode == "soak":
        run(qps=args.qps[0], interval_s=args.interval)
    else:
        best, q, stopped = None, args.qps_start, f"reached --qps-max {args.qps_max:g}"
        while q <= args.qps_max:
            r = run(qps=q)
            if r["sent"] > r["ok"] or r["latency_ms"]["p99"] > args.slo_ms:
                stopped = f"at {q:g} QPS: p99 {r['latency_ms']['p99']:.1f} ms, errors: {codes_text(r['errors'])}"
                break
            best, q = q, q + args.qps_step
        out["sweep"] = {"slo_ms": args.slo_ms, "max_sustainable_qps": best, "stopped": stopped}
    return out


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    meta = {"mode": args.mode, "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "bundle": str(args.bundle), "duration_s": args.duration, "warmup_s": args.warmup, "zipf_s": args.zipf,
            "unknown_share": args.unknown_share, "event_ratio": args.event_ratio, "trace_sample": args.trace_sample,
            "max_requests": args.max_requests, "count": args.count, "timeout_s": args.timeout,
            "procs": args.procs, "channels": args.channels, "seed": args.seed}
    if args.mode == "sweep":
        meta |= {"slo_ms": args.slo_ms, "qps_start": args.qps_start, "qps_step": args.qps_step}
    if args.mode == "soak":
        meta |= {"interval_s": args.interval}
    return meta


def demo_summary(target: str, bundle: str | Path, seconds: float = 10.0, concurrency: int = 4,
                 metrics: str | None = None, server_pid: int | None = None, token: str | None = None) -> dict[str, Any]:
    """`make demo`: a short closed loop against a running server, summed up in five printed lines."""
    spec = LoadSpec(target=target, user_ids=user_ids_path(bundle), concurrency=concurrency, duration_s=seconds,
                    warmup_s=1.0, token=token)
    r = run_load(spec, server_pid, metrics and metrics_url(metrics))
    print("\n".join(summary_lines(r, target)))
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    add_loadtest_args(p)
    return run_loadtest(p.parse_args(argv))
