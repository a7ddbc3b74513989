"""The native server against the Ray Serve backend, one setup after another in one run.

    python -m loadtest.backends --config configs/default.toml --bundle bundles/default \\
        --feature-store redis://127.0.0.1:6399/0 --setups native:1,ray:1,native:2,ray:2,ray-split:1

Each setup is started on this machine (`native:N` = N worker processes, `ray:N` = N Serve
replicas on a local Ray instance, `ray-split:N` = the same with the fine ranker as its own
batched deployment), measured single-stream (one client back to back: what the ingress adds to
a request) and swept in open loop up to its highest QPS at p99 <= --slo-ms, then stopped.
Every setup reads the same feature store, so the differences are the serving path's.

Writes report.json, report.md (with the Ray/native ratios) and p99_vs_qps.png into --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from loadtest.cli import Target, add_loadtest_args, run_target
from loadtest.report import codes_text
from loadtest.target import Server


def _setups(text: str) -> list[tuple[str, int]]:
    out = []
    for s in text.split(","):
        kind, _, n = s.partition(":")
        if kind not in ("native", "ray", "ray-split") or not n.isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"{s!r}: expected native:N, ray:N or ray-split:N")
        out.append((kind, int(n)))
    return out


def _start(kind: str, n: int, args: argparse.Namespace, log: Path) -> Server:
    extra = ["--feature-store", args.feature_store]
    if kind == "native":
        return Server(args.config, args.bundle, n, log, extra=tuple(extra))
    extra += ["--backend", "ray", "--host", "0.0.0.0", "--replicas", str(n), "--ray-cpus", str(args.ray_cpus)]
    if kind == "ray-split":   # both deployments fit the local Ray's CPUs
        extra += ["--set", "ray.split_fine=true", "--set", "ray.num_cpus=0.5", "--set", "ray.fine_num_cpus=0.5"]
    for o in args.server_set:
        extra += ["--set", o]
    return Server(args.config, args.bundle, None, log, extra=tuple(extra))


def _row(t: dict[str, Any]) -> dict[str, Any]:
    single = t["runs"][0]
    return {"setup": t["name"], "single_p50_ms": single["latency_ms"]["p50"],
            "single_p99_ms": single["latency_ms"]["p99"], "single_qps": single["achieved_qps"],
            "max_qps_at_slo": t["sweep"]["max_sustainable_qps"] or 0, "stopped": t["sweep"]["stopped"],
            "cores_single": (single.get("server") or {}).get("cpu_cores")}


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# native vs Ray Serve backend ({meta['started']})", "",
             f"config {meta['config']}, bundle {meta['bundle']}, feature store {meta['feature_store']}, "
             f"SLO p99 <= {meta['slo_ms']:g} ms, {meta['duration_s']:g} s per level", "",
             "| setup | single-stream p50 ms | p99 ms | server cores (single) | highest QPS at SLO | sweep stopped |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        cores = "-" if r["cores_single"] is None else f"{r['cores_single']:.2f}"
        lines.append(f"| {r['setup']} | {r['single_p50_ms']:.2f} | {r['single_p99_ms']:.2f} | {cores} | "
                     f"{r['max_qps_at_slo']:g} | {r['stopped']} |")
    by = {r["setup"]: r for r in rows}
    ratios = []
    for name, r in by.items():
        kind, n = name.split(" x")
        if kind.startswith("ray") and (nat := by.get(f"native x{n}")):
            qps = f"{r['max_qps_at_slo'] / nat['max_qps_at_slo']:.2f}x" if nat["max_qps_at_slo"] else "n/a"
            ratios.append(f"| {name} vs native x{n} | {r['single_p50_ms'] / nat['single_p50_ms']:.2f}x "
                          f"(+{r['single_p50_ms'] - nat['single_p50_ms']:.2f} ms) | "
                          f"{r['single_p99_ms'] / nat['single_p99_ms']:.2f}x | {qps} |")
    if ratios:
        lines += ["", "| ratio | single-stream p50 | p99 | QPS at SLO |", "|---|---:|---:|---:|", *ratios]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in report["targets"]:
        runs = sorted((r for r in t["runs"] if r["mode"] == "open"), key=lambda r: r["offered_qps"])
        ax.plot([r["offered_qps"] for r in runs], [r["latency_ms"]["p99"] for r in runs], marker="o", label=t["name"])
    ax.axhline(report["meta"]["slo_ms"], color="grey", lw=1, label="SLO")
    ax.set(xlabel="offered QPS (open loop)", ylabel="p99 latency ms (log)", yscale="log",
           title="Recommend p99 against load: native workers vs Ray Serve replicas")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.backends", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loadtest_args(p)
    p.add_argument("--feature-store", required=True, help="redis:// or rediscluster:// URL every setup shares")
    p.add_argument("--setups", type=_setups, default=_setups("native:1,ray:1,native:2,ray:2"))
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--server-set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the Ray setups (e.g. ray.access_log=true)")
    args = p.parse_args(["sweep", *(argv if argv is not None else sys.argv[1:])])
    if not args.config:
        p.error("--config is required")
    out = args.out or Path("reports") / f"backends-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "config": str(args.config),
            "bundle": str(args.bundle), "feature_store": args.feature_store, "slo_ms": args.slo_ms,
            "duration_s": args.duration, "qps_start": args.qps_start, "qps_step": args.qps_step}
    targets = []
    for kind, n in args.setups:
        name = f"{kind} x{n}"
        print(f"== {name}", file=sys.stderr)
        with _start(kind, n, args, out / f"{kind}-{n}.log") as srv:
            t = Target(name, srv.target.replace("0.0.0.0", "127.0.0.1"), None, srv.pid)
            single = run_target(t, argparse.Namespace(**{**vars(args), "mode": "closed", "concurrency": [1]}))
            swept = run_target(t, args)
        targets.append({**swept, "runs": single["runs"] + swept["runs"]})
        print(f"   {name}: single p50 {single['runs'][0]['latency_ms']['p50']:.2f} ms; highest QPS at SLO "
              f"{swept['sweep']['max_sustainable_qps']} ({swept['sweep']['stopped']}; "
              f"errors {codes_text(swept['runs'][-1]['errors'])})", file=sys.stderr)
    report = {"meta": meta, "targets": targets}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = _markdown([_row(t) for t in targets], meta)
    (out / "report.md").write_text(md)
    _plot(report, out / "p99_vs_qps.png")
    print(md)
    print(f"report: {out}/report.md {out}/p99_vs_qps.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
