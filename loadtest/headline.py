"""Every headline figure of BENCHMARKS.md in one run, one machine, one command.

    python -m loadtest.headline --config configs/large.toml --bundle bundles/large --out reports/large-headline

In order (the load average is recorded before each step, since a busy machine inflates tails):
1. in-process engine time against the kernel floor (loadtest.floor);
2. the native server (the config's workers): single stream (one client back to back), the
   open-loop sweep to the highest QPS at p99 <= --slo-ms with the server's cores and RSS, then
   overload at --overload x that rate (accepted p99, how fast the excess is refused, goodput),
   then the soak at --soak-share of it with one ReportEvents per two Recommends;
3. the untuned baseline (loadtest.baseline), swept from --baseline-start QPS, and the ratio.
Writes headline.md (figure, value, target, verdict) and headline.json into --out, with each
step's full load-test report in a subfolder. `--soak-minutes 0` skips the soak.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

from loadtest import floor, soak
from loadtest.baseline import BaselineServer
from loadtest.cli import Target, add_loadtest_args, run_target
from loadtest.report import write_report
from loadtest.target import Server

EVENT_SHARE = 1 / 3     # one ReportEvents call per two Recommend calls


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args, self.rows, self.raw = args, [], {"started": datetime.datetime.now().isoformat(timespec="seconds")}

    def step(self, name: str) -> None:
        print(f"== {name} (load average {_load()})", file=sys.stderr)
        self.raw.setdefault("load", {})[name] = _load()

    def row(self, figure: str, value: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append((figure, value, target, "" if ok is None else ("met" if ok else "missed")))

    def load(self, t: Target, name: str, **over: Any) -> dict[str, Any]:
        """One loadtest mode against `t` with the command line's load options and `over`; report in out/name."""
        a = argparse.Namespace(**{**vars(self.args), **over})
        out = run_target(t, a)
        meta = {"mode": a.mode, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "bundle": str(a.bundle), "duration_s": a.duration, "warmup_s": a.warmup, "zipf_s": a.zipf,
                "unknown_share": a.unknown_share, "event_ratio": a.event_ratio, "procs": a.procs,
                "slo_ms": a.slo_ms if a.mode == "sweep" else None}
        write_report({"meta": meta, "targets": [out]}, self.args.out / name)
        self.raw[name] = out
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.headline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loadtest_args(p)
    h = p.add_argument_group("headline")
    h.add_argument("--single-duration", type=float, default=20.0, help="seconds of the single-stream run")
    h.add_argument("--overload", type=float, default=2.0, help="overload step: this times the highest QPS")
    h.add_argument("--soak-share", type=float, default=0.7, help="soak Recommend rate: this times the highest QPS")
    h.add_argument("--soak-minutes", type=float, default=15.0, help="0 skips the soak")
    h.add_argument("--soak-qps", type=float, default=0.0,
                   help="soak calls/s in all, events included (default: from --soak-share of the highest QPS)")
    h.add_argument("--baseline-start", type=float, default=5.0)
    h.add_argument("--baseline-step", type=float, default=5.0)
    args = p.parse_args(["sweep", *(argv if argv is not None else sys.argv[1:])])
    if not args.config:
        p.error("--config is required")
    args.out = args.out or Path("reports") / f"headline-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    args.out.mkdir(parents=True, exist_ok=True)
    r = Run(args)

    r.step("floor")
    f = floor.measure(args.config, args.bundle, requests=300)
    (args.out / "floor.md").write_text(f"```\n{floor.format_floor(f)}\n```\n")
    r.raw["floor"] = f
    ratio = f["engine_ms"]["p50"] / f["floor_ms"]
    r.row("in-process engine p50 / kernel floor", f"{f['engine_ms']['p50']:.2f} / {f['floor_ms']:.2f} ms = "
          f"{ratio:.2f}x", "<= 1.3x", ratio <= 1.3)

    with Server(args.config, args.bundle, args.workers, args.out / "server.log") as srv:   # 0: the config's
        t = Target("recserve", srv.target, srv.metrics_url, srv.pid)
        r.step("single")
        single = r.load(t, "single", mode="closed", concurrency=[1], duration=args.single_duration)["runs"][0]
        lat = single["latency_ms"]
        r.row("single stream through gRPC, p50 / p99", f"{lat['p50']:.2f} / {lat['p99']:.2f} ms", "<= 7 / <= 12 ms",
              lat["p50"] <= 7 and lat["p99"] <= 12)
        r.step("sweep")
        sw = r.load(t, "sweep", mode="sweep")
        best = sw["sweep"]["max_sustainable_qps"] or 0
        at = next((x for x in sw["runs"] if x["offered_qps"] == best), None)
        cores = at["server"]["cpu_cores"] if at else 0.0
        rss = max(x["server"]["rss_mb_peak"] for x in sw["runs"]) / 1024
        r.row(f"highest open-loop QPS at p99 <= {args.slo_ms:g} ms (server cores there)",
              f"{best:g} ({cores:.2f} cores)", ">= 150 (>= 1.6 cores)", best >= 150 and cores >= 1.6)
        r.row("server RSS, parent + workers (peak over the sweep)", f"{rss:.2f} GB", "<= 2.1 GB", rss <= 2.1)
        ref_qps = best or args.qps_start     # a busy machine may meet the SLO at no step: still measure the rest
        if not best:
            r.row("(no step met the SLO: overload and soak are taken relative to the first step)",
                  f"{args.qps_start:g} QPS")
        if ref_qps:
            q = args.overload * ref_qps
            r.step("overload")
            ov = r.load(t, "overload", mode="open", qps=[q], duration=max(args.duration, 20.0))["runs"][0]
            acc = ov.get("latency_by_outcome_ms", {})
            ok99 = acc.get("ok", {}).get("p99", float("inf"))
            ref, sent = acc.get("refused", {}), acc.get("refused_from_send", {})
            deadline = _deadline_ms(args)
            r.row(f"overload at {q:g} QPS: accepted p99", f"{ok99:.1f} ms", f"<= {2 * deadline:g} ms (2x deadline)",
                  ok99 <= 2 * deadline)
            r.row("overload: refusals (RESOURCE_EXHAUSTED) p99, from the schedule", f"{ref.get('p99', 0):.2f} ms "
                  f"({sent.get('p99', 0):.2f} ms from the actual send; "
                  f"{ov['errors'].get('RESOURCE_EXHAUSTED', 0)} calls; other errors "
                  f"{sum(v for k, v in ov['errors'].items() if k != 'RESOURCE_EXHAUSTED')})", "< 5 ms",
                  ref.get("p99", 0) < 5)
            r.row("overload: goodput", f"{ov['achieved_qps']:.1f} QPS", f">= {ref_qps:g} QPS",
                  ov["achieved_qps"] >= ref_qps)
            if args.soak_minutes > 0:
                r.step("soak")
                qs = args.soak_qps or args.soak_share * ref_qps / (1 - EVENT_SHARE)
                run = r.load(t, "soak", mode="soak", qps=[qs], event_ratio=EVENT_SHARE, interval=60.0,
                             duration=args.soak_minutes * 60, max_requests=10**9)["runs"][0]
                v = soak.verdict(run)
                growth = "n/a" if v["rss_growth"] is None else f"{v['rss_growth']:+.1%}"
                r.row(f"soak {args.soak_minutes:g} min at {qs:.0f} calls/s ({EVENT_SHARE:.0%} events)",
                      f"errors {v['errors']}, RSS after minute 1 {growth}, worst minute p99 {v['worst_p99_ms']:.1f} ms",
                      "0 errors, RSS <= +5%", v["passed"])

    with BaselineServer(args.config, args.bundle, args.out / "baseline.log") as base:
        r.step("baseline")
        bs = r.load(Target("baseline", base.target, None, base.pid), "baseline", mode="sweep",
                    qps_start=args.baseline_start, qps_step=args.baseline_step)
        bq = bs["sweep"]["max_sustainable_qps"] or 0
        r.row("baseline highest QPS at the SLO (swept from "
              f"{args.baseline_start:g})", f"{bq:g}", "found (> 0)", bq > 0)
        r.row("recserve / baseline", f"{best / bq:.1f}x" if bq else "n/a", ">= 4x", bool(bq) and best / bq >= 4)

    lines = [f"# Headline figures: {args.config} on {args.bundle}", "",
             f"Started {r.raw['started']}; load average before each step: "
             + ", ".join(f"{k} {v}" for k, v in r.raw["load"].items()), "",
             "| figure | value | target | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in r.rows]
    (args.out / "headline.md").write_text("\n".join(lines) + "\n")
    (args.out / "headline.json").write_text(json.dumps(r.raw, indent=1, default=str) + "\n")
    print("\n".join(lines))
    return 0


def _deadline_ms(args: argparse.Namespace) -> float:
    from engine.core.config import load_config

    return load_config(args.config).serving.deadline_ms


if __name__ == "__main__":
    sys.exit(main())
