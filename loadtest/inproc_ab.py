"""In-process A/B of two configs: one engine each over the same bundle, in one process, fed
the same Zipf-drawn users in alternating blocks of requests.

This host's speed drifts 1.4-1.8x within an hour (BENCHMARKS.md), so two runs one after the
other can disagree by more than the change being measured; alternating short blocks lets the
drift hit both arms alike. Each arm is named by its `KEY=VALUE` overrides of the config.

    python -m loadtest.inproc_ab --config configs/large.toml --bundle bundles/large \\
        --a stage.cold_start.nprobe=0 --b stage.cold_start.nprobe=320 [--requests 800] [--out DIR]
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.bundle import load_bundle
from engine.core.config import load_config
from engine.core.request import Request
from engine.core.runner import Engine
from engine.store.embedded import EmbeddedStore
from loadtest.generator import Users


def measure(config: Path, bundle: Path, arms: dict[str, list[str]], requests: int = 800,
            block: int = 20, seed: int = 0) -> dict[str, Any]:
    """Per arm: latency percentiles (ms) of engine.recommend, each stage's mean time and the
    median of the candidates it passed on."""
    b = load_bundle(bundle)
    engines = {name: Engine(load_config(config, sets), b, make_store=EmbeddedStore) for name, sets in arms.items()}
    users = Users(b.user_ids, 1.1, 0.05, seed, 0)
    e2e: dict[str, list[float]] = collections.defaultdict(list)
    stage: dict[str, dict[str, list[float]]] = {n: collections.defaultdict(list) for n in arms}
    out: dict[str, dict[str, list[int]]] = {n: collections.defaultdict(list) for n in arms}
    try:
        for e in engines.values():                 # warm-up: caches, ORT arenas, page faults
            for _ in range(20):
                e.recommend(Request(user_id=users.next()))
        for _ in range(0, requests, block):
            for name, e in engines.items():
                for _ in range(block):              # each arm gets the next block of users
                    t = time.perf_counter()
                    r = e.recommend(Request(user_id=users.next(), debug=True))
                    e2e[name].append((time.perf_counter() - t) * 1e3)
                    for s in r.trace:
                        stage[name][s.name].append(s.ms)
                        out[name][s.name].append(s.count_out)
    finally:
        for e in engines.values():
            e.close()
    return {"bundle": b.version, "block": block, "arms": {
        name: {"overrides": arms[name], "requests": len(e2e[name]),
               **{f"p{q}": float(np.percentile(e2e[name], q)) for q in (50, 90, 99)},
               "stages_mean_ms": {s: float(np.mean(v)) for s, v in stage[name].items()},
               "stages_rows_out": {s: float(np.median(v)) for s, v in out[name].items()}} for name in arms}}


def format_ab(r: dict[str, Any]) -> str:
    a, b = r["arms"].values()
    lines = [f"in-process A/B on bundle {r['bundle']}, alternating blocks of {r['block']} requests",
             f"{'':<10}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}   overrides"]
    for name, arm in r["arms"].items():
        overrides = " ".join(arm["overrides"]) or "(none)"
        lines.append(f"{name:<10}{arm['p50']:>10.3f}{arm['p90']:>10.3f}{arm['p99']:>10.3f}   {overrides}")
    lines.append(f"{'b / a':<10}" + "".join(f"{b[q] / a[q]:>9.2f}x" for q in ("p50", "p90", "p99")))
    lines.append("stage means (ms), a -> b: " + ", ".join(
        f"{s} {a['stages_mean_ms'][s]:.3f} -> {v:.3f}" for s, v in b["stages_mean_ms"].items() if s in a["stages_mean_ms"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.inproc_ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--bundle", required=True, type=Path, help="bundle root or version folder")
    p.add_argument("--a", nargs="*", default=[], metavar="KEY=VALUE", help="arm a's config overrides")
    p.add_argument("--b", nargs="*", default=[], metavar="KEY=VALUE", help="arm b's config overrides")
    p.add_argument("--requests", type=int, default=800, help="requests per arm")
    p.add_argument("--block", type=int, default=20, help="requests per block before switching arms")
    p.add_argument("--out", type=Path, help="also write ab.json here")
    args = p.parse_args(argv)
    r = measure(args.config, args.bundle, {"a": args.a, "b": args.b}, args.requests, args.block)
    print(format_ab(r))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ab.json").write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
