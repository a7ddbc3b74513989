"""Load-test report: JSON (everything), Markdown (tables) and two PNGs (latency vs QPS, stage times).

A report is `{"meta": {...}, "targets": [{"name", "target", "runs": [result, ...], "sweep"?}]}`
where each result is what loadtest.generator.run_load returns; a second target (the baseline)
is reported side by side with the first.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest import soak
from loadtest.generator import PERCENTILES

PCTS = (*PERCENTILES, "max")


def headline(t: dict[str, Any]) -> dict[str, Any]:
    """The run a target is summed up by: a sweep's highest sustainable step (else its first), else the last."""
    sweep = t.get("sweep")
    if sweep:
        ok = [r for r in t["runs"] if r["offered_qps"] == sweep["max_sustainable_qps"]]
        return ok[0] if ok else t["runs"][0]
    return t["runs"][-1]


def summary_lines(r: dict[str, Any], target: str) -> list[str]:
    """Five lines: the load, the counts, latency, resources, the slowest stages."""
    load = (f"{r['concurrency']} clients (closed loop)" if r["mode"] == "closed"
            else f"{r['offered_qps']:g} QPS offered (open loop)")
    lat = "  ".join(f"{k} {r['latency_ms'][k]:.2f}" for k in PCTS)
    srv = r.get("server")
    res = (f"server {srv['cpu_cores']:.2f} cores ({srv.get('root_cpu_cores', 0):.2f} in its root process), "
           f"{srv['rss_mb_peak']:.0f} MB RSS ({srv['processes']} processes)" if srv else "server CPU/RSS not measured (no pid)")
    slow = sorted(r["stages"], key=lambda s: -s["mean_ms"])[:4]
    return [
        f"load test of {target}: {load}, {r['window_s']:.1f} s measured",
        f"sent {r['sent']} = ok {r['ok']} + errors {r['sent'] - r['ok']} ({codes_text(r['errors'])}); "
        f"{r['achieved_qps']:.1f} QPS ok",
        f"latency ms: {lat}",
        f"{res}; generator {r['generator']['cpu_cores']:.2f} cores",
        "slowest stages (mean ms): " + (", ".join(f"{s['name']} {s['mean_ms']:.2f}" for s in slow) or "no trace"),
    ]


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write report.json, report.md, latency_vs_qps.png and stages.png into `out`; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md",
             "latency_png": out / "latency_vs_qps.png", "stages_png": out / "stages.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown(report))
    _plot_latency(report, paths["latency_png"])
    _plot_stages(report, paths["stages_png"])
    soaks = [r for t in report["targets"] for r in t["runs"] if r.get("intervals")]
    if soaks:
        paths["soak_png"] = out / "soak.png"
        soak.plot(soaks[0], paths["soak_png"])
    return paths


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [f"# recserve load test: {m['mode']}", "",
             f"{m['started']}; {m['duration_s']:g} s measured per level after {m['warmup_s']:g} s warm-up; "
             f"users Zipf s={m['zipf_s']:g} with {m['unknown_share']:.0%} unknown; "
             f"events on {m['event_ratio']:.0%} of calls; {m['procs']} generator process(es).", ""]
    if len(report["targets"]) > 1:
        lines += ["## Side by side", "", "| target | load | QPS ok | p50 | p99 | p99.9 | errors | server cores |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for t in report["targets"]:
            r = headline(t)
            lines.append(f"| {t['name']} | {load_label(r)} | {r['achieved_qps']:.1f} | {r['latency_ms']['p50']:.2f} | "
                         f"{r['latency_ms']['p99']:.2f} | {r['latency_ms']['p99.9']:.2f} | {r['sent'] - r['ok']} | "
                         f"{_cores(r.get('server'))} |")
        if ratio := sweep_ratio(report):
            lines.append(f"\n{ratio}")
        lines.append("")
    for t in report["targets"]:
        lines += [f"## {t['name']} ({t['target']})", "",
                  "| load | QPS ok | sent | ok | errors | " + " | ".join(f"{k} ms" for k in PCTS)
                  + " | server cores | server RSS MB | generator cores |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(PCTS) + "---:|---:|---:|"]
        for r in t["runs"]:
            srv = r.get("server")
            res = f"{_cores(srv)} | {srv['rss_mb_peak']:.0f}" if srv else "- | -"
            lines.append(f"| {load_label(r)} | {r['achieved_qps']:.1f} | {r['sent']} | {r['ok']} | "
                         f"{r['sent'] - r['ok']} | " + " | ".join(f"{r['latency_ms'][k]:.2f}" for k in PCTS)
                         + f" | {res} | {r['generator']['cpu_cores']:.2f} |")
        lines.append("")
        if lags := [f"{load_label(r)} {r['send_lag_ms']['p99']:.2f}" for r in t["runs"] if r["send_lag_ms"]]:
            lines += ["Generator send lag behind the Poisson schedule, p99 ms (counted in the latencies): "
                      + "; ".join(lags), ""]
        for r in t["runs"]:
            if r.get("intervals"):
                lines += soak.markdown(r)
        if sweep := t.get("sweep"):
            best = sweep["max_sustainable_qps"]
            lines += [f"Highest sustainable offered QPS (p99 <= {sweep['slo_ms']:g} ms, no errors): "
                      f"**{best:g}**" if best else "No step met the SLO.", f"Stopped: {sweep['stopped']}.", ""]
        if shed := [r for r in t["runs"] if "refused" in r.get("latency_by_outcome_ms", {})]:
            lines += ["Refused calls (RESOURCE_EXHAUSTED) apart from accepted ones: "
                      + "; ".join(overload_text(r) for r in shed), ""]
        if errs := [f"{load_label(r)}: {codes_text(r['errors'])}" for r in t["runs"] if r["errors"]]:
            lines += ["Errors by status code: " + "; ".join(errs), ""]
        r = headline(t)
        if r["stages"]:
            lines += [f"Stages at {load_label(r)} (mean ms; recall routes run concurrently; server total "
                      f"{r['server_ms_mean'] or 0:.2f} ms vs client mean {r['latency_ms']['mean']:.2f} ms):", "",
                      "| stage | mean ms | candidates out | samples | source |", "|---|---:|---:|---:|---|"]
            lines += [f"| {s['name']} | {s['mean_ms']:.3f} | {_num(s['count_out'])} | {s['n']} | {s['source']} |"
                      for s in r["stages"]]
            lines.append("")
    return "\n".join(lines)


def sweep_ratio(report: dict[str, Any]) -> str | None:
    """One line comparing the first two targets' highest sustainable QPS, when both were swept."""
    swept = [t for t in report["targets"][:2] if t.get("sweep")]
    if len(swept) < 2:
        return None
    a, b = (t["sweep"]["max_sustainable_qps"] or 0 for t in swept)
    ratio = f"{a / b:.1f}x" if b else f"n/a ({swept[1]['name']} met the SLO at no step)"
    return (f"highest sustainable QPS at p99 <= {swept[0]['sweep']['slo_ms']:g} ms: {swept[0]['name']} {a:g}, "
            f"{swept[1]['name']} {b:g}; ratio {ratio}")


def overload_text(r: dict[str, Any]) -> str:
    """Accepted calls' latency, how fast the excess was refused, and the goodput, of one level."""
    by = r["latency_by_outcome_ms"]
    ok, ref, sent = by.get("ok"), by["refused"], by.get("refused_from_send")
    acc = f"accepted p50 {ok['p50']:.1f} p99 {ok['p99']:.1f} ms" if ok else "none accepted"
    own = f" (from the actual send: p50 {sent['p50']:.2f} p99 {sent['p99']:.2f})" if sent else ""
    return (f"{load_label(r)}: {acc}, refused p50 {ref['p50']:.2f} p99 {ref['p99']:.2f} max {ref['max']:.1f} ms"
            f"{own} ({r['errors'].get('RESOURCE_EXHAUSTED', 0)} calls), goodput {r['achieved_qps']:.1f} QPS")


def codes_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none"


def load_label(r: dict[str, Any]) -> str:
    return f"C={r['concurrency']}" if r["mode"] == "closed" else f"{r['offered_qps']:g} QPS"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _cores(srv: dict[str, Any] | None) -> str:
    return f"{srv['cpu_cores']:.2f}" if srv else "-"


def _plot_latency(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one panel per target, shared axes: recserve and the baseline never cover each other, and
    # the legend sits below the panels, never over a point
    targets = report["targets"]
    fig, axes = plt.subplots(1, len(targets), figsize=(5.2 * len(targets), 4.6), sharey=True, squeeze=False)
    slo = report["meta"].get("slo_ms")
    closed = report["meta"]["mode"] == "closed"
    for ax, t in zip(axes[0], targets):
        runs = sorted(t["runs"], key=_x)
        for k, color in zip(PERCENTILES, ("C0", "C1", "C3", "C4")):
            ax.plot([_x(r) for r in runs], [r["latency_ms"][k] for r in runs], "-", marker="o", ms=4, color=color,
                    label=k)
        if slo:
            ax.axhline(slo, color="grey", lw=1, ls="--", label=f"SLO {slo:g} ms")
        best = (t.get("sweep") or {}).get("max_sustainable_qps")
        ax.set(xlabel="achieved QPS (closed loop)" if closed else "offered QPS (open loop)", yscale="log",
               title=f"{t['name']}" + (f": {best:g} QPS at the SLO" if best else ""))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("Recommend latency ms (log)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("Recommend latency against load")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _x(r: dict[str, Any]) -> float:
    return r["achieved_qps"] if r["mode"] == "closed" else r["offered_qps"]


def _plot_stages(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = [(t["name"], headline(t)) for t in report["targets"]]
    names = list(dict.fromkeys(s["name"] for _, r in heads for s in r["stages"]))
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(len(names), 4) + 1.5))
    h = 0.8 / len(heads)
    for i, (tname, r) in enumerate(heads):
        ms = {s["name"]: s["mean_ms"] for s in r["stages"]}
        ax.barh([j + i * h for j in range(len(names))], [ms.get(n, 0.0) for n in names], h,
                label=f"{tname} at {load_label(r)}")
    ax.set_yticks([j + h * (len(heads) - 1) / 2 for j in range(len(names))], names)
    ax.invert_yaxis()
    ax.set(xlabel="mean ms per request", title="Per-stage server time (recall routes run concurrently)")
    if names:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no stage data (no metrics endpoint and no traced sample)", ha="center",
                transform=ax.transAxes)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
