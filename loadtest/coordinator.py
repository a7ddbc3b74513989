"""The coordinator of a load level: start the generator processes, release them together,
watch the server's processes while they run, and sum what they measured into one result."""
from __future__ import annotations

import collections
import multiprocessing as mp
import time
from multiprocessing.connection import Connection, wait as mp_wait
from typing import Any

from loadtest.generator import (CONNECT_TIMEOUT_S, METHODS, OUTCOMES, LoadError, LoadSpec, generator_main, new_hist,
                                percentiles_ms)
from loadtest.target import ProcProbe, scrape_stages


def run_load(spec: LoadSpec, server_pid: int | None = None, metrics_url: str | None = None) -> dict[str, Any]:
    """Run one load level and return its result (see `_merge` for the fields)."""
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    for i in range(spec.procs):
        here, there = ctx.Pipe()
        p = ctx.Process(target=generator_main, args=(spec, i, there), name=f"loadtest-gen-{i}", daemon=True)
        p.start()
        there.close()
        conns.append(here)
        procs.append(p)
    try:
        workers = [_expect(c, "ready", CONNECT_TIMEOUT_S + 60)[0] for c in conns]
        t0 = time.monotonic() + 0.1
        for c in conns:
            c.send(t0)
        probes = {"generator": ProcProbe([p.pid for p in procs], children=False)}
        if server_pid:
            probes["server"] = ProcProbe([server_pid])
        start, end = t0 + spec.warmup_s, t0 + spec.warmup_s + spec.duration_s
        time.sleep(max(0.0, start - time.monotonic()))
        before = scrape_stages(metrics_url) if metrics_url else {}
        for probe in probes.values():
            probe.start()
        server_by_interval: list[dict[str, float]] = []
        next_mark = start + spec.interval_s if spec.interval_s > 0 else float("inf")
        while (left := end - time.monotonic()) > 0 and (busy := [c for c in conns if not c.poll()]):
            mp_wait(busy, timeout=min(left, 0.5, max(next_mark - time.monotonic(), 0.01)))
            for probe in probes.values():
                probe.sample()
            if time.monotonic() >= next_mark:     # the server's RSS and CPU over the interval just ended
                if "server" in probes:
                    server_by_interval.append(probes["server"].interval())
                next_mark += spec.interval_s
        usage = {k: probe.stop() for k, probe in probes.items()}
        after = scrape_stages(metrics_url) if metrics_url else {}
        results = [_expect(c, "done", spec.timeout_s + 60)[0] for c in conns]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    out = _merge(spec, results, workers, usage, before, after)
    if spec.interval_s > 0:
        out["intervals"] = _intervals(spec, results, server_by_interval)
    return out


def _expect(conn: Connection, kind: str, timeout: float) -> tuple:
    if not conn.poll(timeout):
        raise LoadError(f"a generator process sent no '{kind}' within {timeout:.0f} s")
    try:
        msg = conn.recv()
    except EOFError:
        raise LoadError("a generator process died") from None
    if msg[0] == "error":
        raise LoadError(msg[1])
    return msg[1:]


def _merge(spec: LoadSpec, results: list[dict[str, Any]], workers: list[int], usage: dict[str, Any],
           before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Sum the generators' counts and histograms into one result of this load level."""
    window = max(r["window_s"] for r in results)
    methods: dict[str, Any] = {}
    errors: collections.Counter[str] = collections.Counter()
    for m in METHODS:
        h, codes = new_hist(), collections.Counter()
        for r in results:
            h.decode_and_add(r["methods"][m]["hist"])
            codes.update(r["methods"][m]["codes"])
        if codes:
            ok = codes.pop("OK", 0)
            methods[m] = {"sent": ok + sum(codes.values()), "ok": ok, "errors": dict(codes),
                          "qps": ok / window if window > 0 else 0.0, "latency_ms": percentiles_ms(h)}
            errors.update(codes)
    ok = sum(m["ok"] for m in methods.values())
    lag = new_hist()
    for r in results:
        lag.decode_and_add(r["lag"])
    server_ms = [sum(r["server_ms"][i] for r in results) for i in (0, 1)]
    outcome = {k: new_hist() for k in OUTCOMES}
    for r in results:
        for k, h in outcome.items():
            h.decode_and_add(r["by_outcome"][k])
    return {
        "mode": spec.mode, "concurrency": spec.concurrency or None, "offered_qps": spec.qps or None,
        "window_s": window, "sent": sum(r["sent"] for r in results), "ok": ok, "errors": dict(errors),
        "achieved_qps": ok / window if window > 0 else 0.0,
        "latency_ms": methods.get("Recommend", {}).get("latency_ms", percentiles_ms(new_hist())),
        "methods": methods, "degraded": sum(r["degraded"] for r in results),
        "latency_by_outcome_ms": {k: percentiles_ms(h) for k, h in outcome.items() if h.get_total_count()},
        "server_ms_mean": server_ms[0] / server_ms[1] if server_ms[1] else None,
        "send_lag_ms": percentiles_ms(lag) if spec.mode == "open" else None,
        "stages": _stages(results, before, after),
        "server": usage.get("server"), "generator": usage["generator"],
        "connections": sum(r["connections"] for r in results), "server_workers_seen": max(workers),
    }


def _stages(results: list[dict[str, Any]], before: dict[str, tuple[float, float]],
            after: dict[str, tuple[float, float]]) -> list[dict[str, Any]]:
    """Mean ms per stage in pipeline order (as traced): from the server's Prometheus histograms
    over the window when scraped (every request), else from the sampled debug traces."""
    traced: dict[str, list[float]] = {}
    for r in results:
        for name, vals in r["stages"].items():
            acc = traced.setdefault(name, [0.0, 0.0, 0])
            for i, v in enumerate(vals):
                acc[i] += v
    out = []
    for name in [*traced, *sorted(set(after) - set(traced))]:
        b, a = before.get(name, (0.0, 0.0)), after.get(name, (0.0, 0.0))
        s, n = a[0] - b[0], a[1] - b[1]
        t = traced.get(name)
        if n > 0:
            row = {"name": name, "mean_ms": s * 1e3 / n, "n": int(n), "source": "prometheus"}
        elif t:
            row = {"name": name, "mean_ms": t[0] / t[2], "n": int(t[2]), "source": "trace"}
        else:
            continue
        row["count_out"] = t[1] / t[2] if t else None
        out.append(row)
    return out


def _intervals(spec: LoadSpec, results: list[dict[str, Any]],
               server: list[dict[str, float]]) -> list[dict[str, Any]]:
    """Per interval of the window: Recommend latency percentiles and codes (all generators
    summed), and the server's RSS at the interval's end and cores over it."""
    keys = sorted({int(i) for r in results for i in r["intervals"]})
    out = []
    for i in keys:
        h, codes = new_hist(), collections.Counter()
        for r in results:
            if (got := r["intervals"].get(i)) is not None:
                h.decode_and_add(got[0])
                codes.update(got[1])
        ok = codes.pop("OK", 0)
        row = {"interval": i, "t_s": i * spec.interval_s, "ok": ok, "errors": dict(codes),
               "latency_ms": percentiles_ms(h)}
        if i < len(server):
            row["server"] = server[i]
        out.append(row)
    return out
