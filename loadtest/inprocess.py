"""Single-request latency of the engine in-process (no gRPC): p50/p99 end to end and per stage.

    python -m loadtest.inprocess --config configs/default.toml --bundle bundles/default [--requests 2000]

Users are drawn like the load generator's (Zipf over the bundle's users plus unknown users); the first
`--warmup` requests are not counted. Writes JSON, Markdown and a stage-breakdown PNG.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from engine.core.bundle import load_bundle
from engine.core.config import load_config
from engine.core.runner import Engine
from engine.core.request import Request
from engine.store.embedded import EmbeddedStore
from loadtest.generator import Users
from model_export.progress import bar


class _CpuClock:
    """Stands in for the `time` module of the engine's runner and request context, so stage
    traces and deadlines count this thread's CPU time: a stage's figure is its own CPU, not
    the machine's load. Routes on the recall pool (not inline) then count as ~0."""
    perf_counter = staticmethod(time.thread_time)


def run(config: str, bundle: str, requests: int, warmup: int, count: int, unknown_share: float,
        out: Path, overrides: list[str] = (), cpu_clock: bool = False) -> dict:
    if cpu_clock:
        import engine.core.context
        import engine.core.runner

        engine.core.runner.time = engine.core.context.time = _CpuClock
    cfg = load_config(config, overrides)   # e.g. serving.tree_runtime="native": A/B on one config file
    loaded = load_bundle(bundle)
    engine = Engine(cfg, loaded, make_store=EmbeddedStore)
    users = Users(loaded.user_ids, 1.1, unknown_share, seed=0, stream=0)
    total, stages = [], {}
    for i in bar(range(warmup + requests), desc="in-process requests", unit="req"):
        resp = engine.recommend(Request(user_id=users.next(), count=count, deadline_ms=10_000))
        if i < warmup:
            continue
        total.append(resp.total_ms)
        for t in resp.trace:
            stages.setdefault(t.name, []).append(t.ms)
    pct = lambda xs, q: float(np.percentile(xs, q))
    report = {
        "config": config, "overrides": list(overrides), "bundle": engine.bundle_version, "requests": requests, "count": count,
        "unknown_share": unknown_share,
        "total_ms": {"p50": pct(total, 50), "p90": pct(total, 90), "p99": pct(total, 99), "max": max(total)},
        "stages_ms": {k: {"p50": pct(v, 50), "p99": pct(v, 99), "mean": float(np.mean(v))} for k, v in stages.items()},
    }
    engine.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "inprocess.json").write_text(json.dumps(report, indent=1))
    lines = [f"In-process, {requests} requests, count={count}, bundle {report['bundle']}"
             + (f", overrides {' '.join(overrides)}" if overrides else ""), "",
             "| step | p50 ms | p99 ms | mean ms |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['p50']:.3f} | {v['p99']:.3f} | {v['mean']:.3f} |" for k, v in report["stages_ms"].items()]
    t = report["total_ms"]
    lines += [f"| **total** | **{t['p50']:.3f}** | **{t['p99']:.3f}** | |"]
    (out / "inprocess.md").write_text("\n".join(lines) + "\n")
    _plot(report, out / "inprocess_stages.png")
    print("\n".join(lines))
    return report


def _plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["stages_ms"])
    p50 = [report["stages_ms"][k]["p50"] for k in names]
    p99 = [report["stages_ms"][k]["p99"] for k in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    y = np.arange(len(names))
    ax.barh(y - 0.2, p50, 0.4, label="p50")
    ax.barh(y + 0.2, p99, 0.4, label="p99")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"per-stage latency, in-process ({report['bundle']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--unknown-share", type=float, default=0.05)
    p.add_argument("--out", type=Path, default=Path("reports/inprocess"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help='config override, TOML value: --set serving.tree_runtime=\'"native"\'')
    p.add_argument("--cpu-clock", action="store_true",
                   help="time stages by this thread's CPU clock instead of the wall clock (busy machines)")
    a = p.parse_args(argv)
    run(a.config, a.bundle, a.requests, a.warmup, a.count, a.unknown_share, a.out, a.set, a.cpu_clock)


if __name__ == "__main__":
    main()
