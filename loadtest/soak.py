"""The soak: one long open-loop level, reported per interval (a minute by default).

    python -m loadtest soak --config configs/large.toml --bundle bundles/large \\
        --qps 105 --event-ratio 0.333 --duration 900 --interval 60 --out reports/large-soak

What a soak is for: errors that only show after a while, a p99 that creeps, memory that
grows. Per interval it reports Recommend p50/p99 and status codes, the server's RSS, PSS and
private memory (at the interval's end; loadtest.target says why all three) and cores; the
verdict holds the run to no errors at all and RSS after the first interval (warm caches, filled
arenas) growing by at most RSS_GROWTH_MAX.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

RSS_GROWTH_MAX = 0.05


def verdict(run: dict[str, Any]) -> dict[str, Any]:
    """Errors, RSS growth after the first interval and the worst interval's p99."""
    rows = run["intervals"]
    srv = [r["server"] for r in rows if "server" in r]
    rss = [x["rss_mb"] for x in srv]
    growth = _growth(rss)
    errors = run["sent"] - run["ok"]
    return {"errors": errors, "rss_first_mb": rss[0] if rss else None, "rss_last_mb": rss[-1] if rss else None,
            "rss_growth": growth, "worst_p99_ms": max((r["latency_ms"]["p99"] for r in rows), default=None),
            "pss_growth": _growth([x.get("pss_mb", 0.0) for x in srv]),
            "private_growth": _growth([x.get("private_mb", 0.0) for x in srv]),
            "passed": errors == 0 and growth is not None and growth <= RSS_GROWTH_MAX}


def _growth(mb: list[float]) -> float | None:
    """The largest value after the first interval against the first."""
    return (max(mb[1:]) / mb[0] - 1) if len(mb) > 1 and mb[0] > 0 else None


def markdown(run: dict[str, Any]) -> list[str]:
    v = verdict(run)
    growth = "n/a (no server pid)" if v["rss_growth"] is None else f"{v['rss_growth']:+.1%}"
    lines = [f"### Soak: {run['offered_qps']:g} calls/s offered for {run['window_s']:.0f} s", "",
             f"**{'passed' if v['passed'] else 'FAILED'}**: errors {v['errors']} (must be 0); server RSS after "
             f"the first interval {growth} (at most +{RSS_GROWTH_MAX:.0%}); worst interval p99 "
             f"{v['worst_p99_ms']:.2f} ms", ""]
    if v["pss_growth"] is not None and v["private_growth"] is not None:
        lines += [f"Memory without shared pages counted once per process: PSS {v['pss_growth']:+.1%}, "
                  f"private {v['private_growth']:+.1%} after the first interval.", ""]
    lines += ["| from s | Recommend ok | errors | p50 ms | p99 ms | max ms | server RSS MB | per process MB | "
              "PSS MB | private MB | server cores |", "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in run["intervals"]:
        srv = r.get("server")
        each = " / ".join(f"{x:.0f}" for x in (srv or {}).get("rss_mb_each", ()))
        res = (f"{srv['rss_mb']:.0f} | {each} | {srv.get('pss_mb', 0):.0f} | {srv.get('private_mb', 0):.0f} | "
               f"{srv['cpu_cores']:.2f}" if srv else "- | - | - | - | -")
        lat = r["latency_ms"]
        lines.append(f"| {r['t_s']:.0f} | {r['ok']} | {sum(r['errors'].values())} | {lat['p50']:.2f} | "
                     f"{lat['p99']:.2f} | {lat['max']:.2f} | {res} |")
    return lines + [""]


def plot(run: dict[str, Any], path: Path) -> None:
    """p99 and RSS per interval, on two axes side by side (nothing overlaps a legend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run["intervals"]
    t = [r["t_s"] / 60 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(t, [r["latency_ms"]["p99"] for r in rows], marker="o", label="p99")
    a.plot(t, [r["latency_ms"]["p50"] for r in rows], marker="o", label="p50")
    a.set(xlabel="minute", ylabel="Recommend latency ms", title="latency per interval", ylim=(0, None))
    a.legend(loc="lower right", fontsize=8)
    srv = [(r["t_s"] / 60, r["server"]["rss_mb"]) for r in rows if "server" in r]
    if srv:
        b.plot(*zip(*srv), marker="o", color="C2")
    b.set(xlabel="minute", ylabel="server RSS MB", title="server RSS at each interval's end", ylim=(0, None))
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
