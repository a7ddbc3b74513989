"""Kernel floor: each stage's core computation alone, on the inputs real requests give it.

Runs the real engine in-process on Zipf-drawn users (as the load generator draws them),
records the arguments of every kernel call (faiss search, LightGBM predict, each ONNX
session at its serving batch, the rerank beam search), then replays each call alone. The
sum of the kernels' medians is the floor to hold end-to-end latency against: everything
above it is features, Python glue, threads and gRPC.

    python -m loadtest.floor --config configs/tiny.toml --bundle bundles/tiny [--out reports/floor]
"""
from __future__ import annotations

import argparse
import collections
import json
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

import stages.rerank_beam
from engine.core.bundle import load_bundle
from engine.core.config import load_config
from engine.core.runner import Engine
from engine.core.models import Models
from engine.core.request import Request
from engine.store.embedded import EmbeddedStore
from indexes import FaissIndex
from loadtest.generator import Users

Call = tuple[Callable[..., Any], tuple, dict]


class Recorder:
    """Wraps the kernels so every call made while recording keeps (function, args) for replay."""

    def __init__(self) -> None:
        self.calls: dict[str, list[Call]] = collections.defaultdict(list)
        self.rows: dict[str, list[int]] = collections.defaultdict(list)
        self.on = False
        self.lock = threading.Lock()       # ANN runs on a recall thread

    @contextmanager
    def patched(self) -> Iterator[Recorder]:
        targets: list[tuple[Any, str, Callable[..., tuple[str, int]]]] = [
            (FaissIndex, "search", lambda _, q, k: (f"faiss search k={k}", len(q))),
            (Models, "predict_trees", lambda _, x: ("lightgbm predict", len(x))),
            (Models, "run", lambda _, name, feeds, **__: (f"onnx {name}", max(len(v) for v in feeds.values()))),
            (stages.rerank_beam, "beam_search", lambda fused, *_, **__: ("beam search", fused.size)),
        ]
        originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
        for (owner, attr, label), (_, _, fn) in zip(targets, originals):
            setattr(owner, attr, self._wrap(fn, label))
        try:
            yield self
        finally:
            for owner, attr, fn in originals:
                setattr(owner, attr, fn)

    def _wrap(self, fn: Callable[..., Any], label: Callable[..., tuple[str, int]]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            if self.on:
                name, rows = label(*args, **kwargs)
                with self.lock:
                    self.calls[name].append((fn, args, kwargs))
                    self.rows[name].append(rows)
            return fn(*args, **kwargs)
        return recorded


def measure(config: Path, bundle: Path, requests: int = 200, reps: int = 5, seed: int = 0) -> dict[str, Any]:
    """Kernel medians (ms) and their sum per request, next to the in-process engine's latency."""
    b = load_bundle(bundle)
    engine = Engine(load_config(config), b, make_store=EmbeddedStore)
    users = Users(b.user_ids, 1.1, 0.05, seed, 0)
    reqs = [users.next() for _ in range(requests)]
    rec = Recorder()
    with rec.patched():
        for u in reqs[: min(20, requests)]:          # warm-up: caches, ORT arenas, page faults
            engine.recommend(Request(user_id=u))
        e2e, stage_ms = [], collections.defaultdict(list)
        rec.on = True
        for u in reqs:
            t = time.perf_counter()
            r = engine.recommend(Request(user_id=u, debug=True))
            e2e.append((time.perf_counter() - t) * 1e3)
            for s in r.trace:
                stage_ms[s.name].append(s.ms)
        rec.on = False
        kernels = []
        for name, calls in rec.calls.items():
            ms = _replay(calls, reps)
            kernels.append({"kernel": name, "calls_per_request": len(calls) / requests,
                            "rows_median": float(np.median(rec.rows[name])),
                            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))})
    engine.close()
    return {"bundle": b.version, "requests": requests, "kernels": kernels,
            "floor_ms": sum(k["p50_ms"] * k["calls_per_request"] for k in kernels),
            "engine_ms": {"p50": float(np.percentile(e2e, 50)), "p99": float(np.percentile(e2e, 99))},
            "stages_mean_ms": {k: float(np.mean(v)) for k, v in stage_ms.items()}}


def _replay(calls: list[Call], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        for fn, args, kwargs in calls:
            t = time.perf_counter()
            fn(*args, **kwargs)
            out.append((time.perf_counter() - t) * 1e3)
    return out


def format_floor(f: dict[str, Any]) -> str:
    lines = [f"kernel floor of bundle {f['bundle']} over {f['requests']} requests (in-process, one thread per kernel)",
             f"{'kernel':<24}{'calls/req':>10}{'rows':>8}{'p50 ms':>10}{'p99 ms':>10}"]
    lines += [f"{k['kernel']:<24}{k['calls_per_request']:>10.2f}{k['rows_median']:>8.0f}{k['p50_ms']:>10.3f}"
              f"{k['p99_ms']:>10.3f}" for k in f["kernels"]]
    e = f["engine_ms"]
    lines += [f"sum of kernel p50s: {f['floor_ms']:.3f} ms per request",
              f"engine.recommend in-process: p50 {e['p50']:.3f} ms, p99 {e['p99']:.3f} ms "
              f"({e['p50'] / f['floor_ms']:.1f}x the floor)" if f["floor_ms"] else "",
              "stage means (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in f["stages_mean_ms"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--bundle", required=True, type=Path, help="bundle root or version folder")
    p.add_argument("--requests", type=int, default=200, help="recorded requests (users drawn Zipf)")
    p.add_argument("--reps", type=int, default=5, help="replays of every recorded call")
    p.add_argument("--out", type=Path, help="also write floor.json and floor.md here")
    args = p.parse_args(argv)
    f = measure(args.config, args.bundle, args.requests, args.reps)
    text = format_floor(f)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "floor.json").write_text(json.dumps(f, indent=2) + "\n")
        (args.out / "floor.md").write_text(f"```\n{text}\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
