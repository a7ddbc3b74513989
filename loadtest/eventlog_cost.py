"""What the embedded store's event log costs a ReportEvents call: with it and without, same machine.

Starts `recserve serve` on the bundle twice, one after the other: with the log (`--state-dir`
in a tmp dir next to this machine's other files: each call returns once its batch is fsync'd)
and without (`--state-dir none`: memory only), and sends each the same ReportEvents calls,
first from one client in a loop, then from several clients at once (where the group commit
lets concurrent calls share an fsync). Prints p50/p99 per call, calls/s, the fsyncs per call
(the workers' `store.log_fsyncs`, from /metrics) and, for scale, a bare write + fsync there.

    .venv/bin/python -m loadtest.eventlog_cost --config configs/tiny.toml --bundle bundles/tiny
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from engine.core.bundle import resolve
from loadtest.target import Server
from protos import pb2, pb2_grpc

TICK_S = 1.2   # workers publish their store counters to /metrics every second
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _batches(bundle: Path, n: int, size: int, seed: int) -> list[pb2.ReportEventsRequest]:
    v = resolve(bundle)
    users = np.load(v / "tables/user_ids.npy", allow_pickle=False)
    items = np.load(v / "tables/item_ids.npy", allow_pickle=False)
    rng = np.random.default_rng(seed)
    return [pb2.ReportEventsRequest(events=[
        pb2.Event(kind=pb2.EventKind.EVENT_KIND_IMPRESSION, user_id=str(users[u]), item_id=str(items[i]))
        for u, i in zip(rng.integers(0, users.size, size), rng.integers(0, items.size, size))]) for _ in range(n)]


def _send(target: str, batches: list[pb2.ReportEventsRequest], out: list[float]) -> None:
    with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
        stub = pb2_grpc.RecServeStub(channel)
        for b in batches:
            t = time.perf_counter()
            stub.ReportEvents(b, timeout=30)
            out.append((time.perf_counter() - t) * 1e3)


def _fsyncs(url: str) -> float:
    """The workers' event log fsyncs so far (recserve_feature_store{counter="log_fsyncs"}, summed)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    time.sleep(TICK_S)
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "recserve_feature_store"
               for s in fam.samples if s.labels.get("counter") == "log_fsyncs")


def bare_fsync(directory: str, n: int = 500) -> tuple[float, float]:
    """p50/p99 ms of appending 200 bytes to a file in `directory` and fsyncing it."""
    ms = []
    fd = os.open(os.path.join(directory, "fsync-probe"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, b"x" * 200)
            os.fsync(fd)
            ms.append((time.perf_counter() - t) * 1e3)
    finally:
        os.close(fd)
        os.unlink(os.path.join(directory, "fsync-probe"))
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def measure(target: str, metrics: str, batches: list[pb2.ReportEventsRequest], clients: int) -> dict[str, float]:
    _send(target, batches[:50], [])                       # warm-up: connections, first fsyncs
    f0 = _fsyncs(metrics)
    one: list[float] = []
    _send(target, batches, one)
    f1 = _fsyncs(metrics)
    many: list[list[float]] = [[] for _ in range(clients)]
    threads = [threading.Thread(target=_send, args=(target, batches[k::clients], many[k])) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    f2 = _fsyncs(metrics)
    both = np.concatenate([np.array(m) for m in many])
    return {"p50": float(np.percentile(one, 50)), "p99": float(np.percentile(one, 99)), "qps": len(one) / sum(one) * 1e3,
            "fs": (f1 - f0) / len(one), "c_p50": float(np.percentile(both, 50)),
            "c_p99": float(np.percentile(both, 99)), "c_qps": both.size / wall, "c_fs": (f2 - f1) / both.size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--calls", type=int, default=2000, help="ReportEvents calls per run")
    p.add_argument("--events", type=int, default=10, help="impressions per call")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the second run")
    a = p.parse_args(argv)
    batches = _batches(a.bundle, a.calls, a.events, seed=0)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="recserve-eventlog-", dir=Path.home()) as state:
        bare = bare_fsync(state)
        for name, state_dir in (("with the log", state), ("without (--state-dir none)", "none")):
            log = Path(state).parent / f".{Path(state).name}-server-{len(rows)}.stderr"
            with Server(a.config, a.bundle, workers=a.workers, log=log, extra=("--state-dir", state_dir)) as srv:
                rows[name] = measure(srv.target, srv.metrics_url, batches, a.clients)
            log.unlink()
    print(f"ReportEvents, {a.events} impressions per call, {a.calls} calls, {a.workers} workers; "
          f"state dir under {Path.home()}: a bare 200-byte write + fsync there p50 {bare[0]:.2f} / p99 {bare[1]:.2f} ms")
    print(f"{'':28} {'1 client p50/p99 ms':>20} {'calls/s':>8} {'fsync/call':>10}   "
          f"{a.clients} clients p50/p99 ms {'calls/s':>8} {'fsync/call':>10}")
    for name, r in rows.items():
        print(f"{name:28} {r['p50']:>9.2f} / {r['p99']:<8.2f} {r['qps']:>8.0f} {r['fs']:>10.2f}   "
              f"{r['c_p50']:>8.2f} / {r['c_p99']:<8.2f} {r['c_qps']:>8.0f} {r['c_fs']:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
