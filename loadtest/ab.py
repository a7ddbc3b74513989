"""Before/after on a busy machine: several servers up at once, loaded in turn, round after round.

    git archive <before-commit> | tar -x -C /tmp/before
    python -m loadtest.ab --config configs/large.toml --bundle bundles/large \\
        --variant before=/tmp/before --variant after=. --rounds 3 \\
        --level closed:1 --level open:60 --level open:60:channels=1 --out reports/ab-process-model

Each variant is a source tree (its own `engine`, started from that folder with this
interpreter) and optional `recserve serve` flags and environment variables (`name=TREE`,
`name=TREE:--workers 1`, `name=.:--backend ray --host 0.0.0.0 RAY_SERVE_X=1`).
All servers start first and stay up; then every round runs every level against every variant
back to back (the order rotates each round), so the machine's other load falls on all of
them alike, and an idle server costs nothing but memory. A level is `closed:C` or `open:QPS`,
with `:channels=N` (connections per generator) or `:events=R` (ReportEvents share) added.
The report takes the median over rounds of each figure, with every round's value and the
load average, and the ratio of each variant to the first.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadtest.cli import user_ids_path
from loadtest.coordinator import run_load
from loadtest.generator import LoadSpec
from loadtest.target import Server

FIGURES = ("p50", "p99", "qps", "cores")


def _level(text: str) -> tuple[str, dict[str, Any]]:
    kind, value, *opts = text.split(":")
    if kind not in ("closed", "open"):
        raise argparse.ArgumentTypeError(f"{text!r}: closed:C or open:QPS[:channels=N][:events=R]")
    spec: dict[str, Any] = {"concurrency": int(value)} if kind == "closed" else {"qps": float(value)}
    for o in opts:
        k, _, v = o.partition("=")
        if k not in ("channels", "events"):
            raise argparse.ArgumentTypeError(f"{o!r}: channels=N or events=R")
        spec["channels" if k == "channels" else "event_ratio"] = int(v) if k == "channels" else float(v)
    return text, spec


def _variant(text: str) -> tuple[str, Path, tuple[str, ...]]:
    name, _, rest = text.partition("=")
    tree, _, flags = rest.partition(":")
    if not name or not tree or not Path(tree).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: NAME=TREE[:serve flags], TREE a source folder")
    return name, Path(tree).resolve(), tuple(flags.split())


class TreeServer(Server):
    """`recserve serve` run from another source tree (its `engine` package first on the path).
    `extra`: serve flags, and NAME=VALUE environment variables for it (e.g. Ray Serve's)."""

    def __init__(self, tree: Path, config: Path, bundle: Path, log: Path, extra: tuple[str, ...]):
        env = dict(os.environ)
        env.update(x.split("=", 1) for x in extra if "=" in x and not x.startswith("-"))
        flags = [x for x in extra if not ("=" in x and not x.startswith("-"))]
        ray = "ray" in flags and "--backend" in flags
        self.state_dir = None if ray else tempfile.mkdtemp(prefix="recserve-ab-state-")
        cmd = [sys.executable, "-m", "engine.cli.main", "serve", "--config", str(config.resolve()),
               "--bundle", str(bundle.resolve()), "--port", "0", *flags]
        if self.state_dir:
            cmd += ["--state-dir", self.state_dir]
        self.metrics_url = None
        ready = self._start(cmd, "recserve", log, 600.0, cwd=tree, env=env)
        self.target = ready.target.replace("0.0.0.0", "127.0.0.1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--variant", action="append", type=_variant, required=True, help="NAME=TREE[:serve flags]")
    p.add_argument("--level", action="append", type=_level, required=True, help="closed:C or open:QPS[:opts]")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    out = a.out or Path("reports") / f"ab-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    servers: dict[str, Server] = {}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {v[0]: {lv[0]: [] for lv in a.level} for v in a.variant}
    try:
        for name, tree, flags in a.variant:
            servers[name] = TreeServer(tree, a.config, a.bundle, out / f"{name}.log", flags)
            print(f"started {name} ({tree}) on {servers[name].target}", file=sys.stderr)
        names = [v[0] for v in a.variant]
        for rnd in range(a.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for label, level in a.level:
                for name in order:
                    load = os.getloadavg()[0]
                    spec = LoadSpec(target=servers[name].target, user_ids=user_ids_path(a.bundle),
                                    duration_s=a.duration, warmup_s=a.warmup, **level)
                    r = run_load(spec, servers[name].pid)
                    row = {"round": rnd, "load": load, "p50": r["latency_ms"]["p50"], "p99": r["latency_ms"]["p99"],
                           "qps": r["achieved_qps"], "cores": r["server"]["cpu_cores"], "errors": r["errors"],
                           "refused": {k: v["p99"] for k, v in r.get("latency_by_outcome_ms", {}).items()
                                       if k.startswith("refused")}}   # RESOURCE_EXHAUSTED p99, when any
                    results[name][label].append(row)
                    print(f"round {rnd} {label:>22} {name:>10}: p50 {row['p50']:7.2f} p99 {row['p99']:7.2f} ms, "
                          f"{row['qps']:6.1f} QPS ok, {row['cores']:.2f} cores, errors {sum(r['errors'].values())}, "
                          f"load {load:.2f}", file=sys.stderr)
    finally:
        for s in servers.values():
            s.stop()
    (out / "ab.json").write_text(json.dumps(results, indent=1) + "\n")
    md = _markdown(results, a)
    (out / "ab.md").write_text(md)
    print(md)
    return 0


def _markdown(results: dict[str, dict[str, list[dict[str, Any]]]], a: argparse.Namespace) -> str:
    names = list(results)
    base = names[0]
    lines = [f"# A/B, interleaved: {a.rounds} rounds x {a.duration:g} s per level, {a.config} on {a.bundle}", "",
             "Medians over rounds (every round's value in ab.json); ratio = variant / " + base + ".", "",
             "| level | variant | p50 ms | p99 ms | QPS ok | server cores | errors (all rounds) | refused p99 ms "
             "(from the send) | p50 ratio | p99 ratio | load avg |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, _ in a.level:
        med = {n: {f: statistics.median(r[f] for r in results[n][label]) for f in (*FIGURES, "load")} for n in names}
        for n in names:
            m, b = med[n], med[base]
            errs = sum(sum(r["errors"].values()) for r in results[n][label])
            lines.append(f"| {label} | {n} | {m['p50']:.2f} | {m['p99']:.2f} | {m['qps']:.1f} | {m['cores']:.2f} | "
                         f"{errs} | {_refused(results[n][label])} | {m['p50'] / b['p50']:.2f} | "
                         f"{m['p99'] / b['p99']:.2f} | {m['load']:.1f} |")
    return "\n".join(lines) + "\n"


def _refused(rows: list[dict[str, Any]]) -> str:
    """Median over the rounds that refused anything of the refusals' p99, from the schedule and
    (in parentheses) from the actual send; blank when no round refused a call."""
    def med(key: str) -> float | None:
        v = [r["refused"][key] for r in rows if key in r.get("refused", {})]
        return statistics.median(v) if v else None
    sched, send = med("refused"), med("refused_from_send")
    if sched is None:
        return ""
    return f"{sched:.2f}" + (f" ({send:.2f})" if send is not None else "")


if __name__ == "__main__":
    sys.exit(main())
