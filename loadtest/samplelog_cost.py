"""What the sample log costs a Recommend: logging on and off, measured in one run.

Starts `recserve serve` on the bundle three times at once, one worker each: one writing the
sample log (files backend in a tmp folder under $HOME, or Redis streams with --redis URL) and
two with `log.backend = "off"`. One client sends each call to all three, back to back, in an
order that rotates call by call, so all see the same machine load (other processes on this
2-core machine come and go). Prints p50/p90/p99 per server, the difference of the p50s and the
median of the per-call differences against the first "off" server (the second "off" server's
differences are the noise floor of the method: an A/A comparison), and the time the logging
worker itself counted in the sample log per call (GetStatus samplelog.recommend_us).

    .venv/bin/python -m loadtest.samplelog_cost --config configs/tiny.toml --bundle bundles/tiny
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from engine.core.bundle import resolve
from loadtest.target import Server
from protos import pb2, pb2_grpc

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
WARMUP = 200


def _requests(bundle: Path, n: int, count: int, seed: int) -> list[pb2.RecommendRequest]:
    users = np.load(resolve(bundle) / "tables/user_ids.npy", allow_pickle=False)
    rng = np.random.default_rng(seed)
    return [pb2.RecommendRequest(user_id=str(users[u]), count=count, context={"hour": int(h)})
            for u, h in zip(rng.integers(0, users.size, n), rng.integers(0, 24, n))]


def measure(targets: dict[str, str], requests: list[pb2.RecommendRequest]) -> dict[str, np.ndarray]:
    """ms per call for each target; each call goes to every target, in a rotating order."""
    channels = {k: grpc.insecure_channel(t, options=OWN_CONNECTION) for k, t in targets.items()}
    stubs = list({k: pb2_grpc.RecServeStub(c) for k, c in channels.items()}.items())
    out: dict[str, list[float]] = {k: [] for k in targets}
    try:
        for i, req in enumerate(requests[:WARMUP] + requests):
            for name, stub in stubs[i % len(stubs):] + stubs[:i % len(stubs)]:
                t = time.perf_counter()
                stub.Recommend(req, timeout=30)
                if i >= WARMUP:
                    out[name].append((time.perf_counter() - t) * 1e3)
    finally:
        for c in channels.values():
            c.close()
    return {k: np.array(v) for k, v in out.items()}


def _inside(target: str) -> float:
    """ms per Recommend the logging worker spent in the sample log, by its own count."""
    time.sleep(1.5)                      # counters reach GetStatus with the worker's 1 s tick
    with grpc.insecure_channel(target) as channel:
        c = pb2_grpc.AdminStub(channel).GetStatus(pb2.GetStatusRequest(), timeout=10).counters
    return c["samplelog.recommend_us"] / max(c["samplelog.recommend_calls"], 1) / 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--calls", type=int, default=3000, help="Recommend calls to each server")
    p.add_argument("--count", type=int, default=20, help="items per list")
    p.add_argument("--redis", default=None, metavar="URL", help="measure the Redis streams backend at URL instead")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the logging server, e.g. --set log.fsync_s=0 (repeatable)")
    a = p.parse_args(argv)
    requests = _requests(a.bundle, a.calls, a.count, seed=0)
    with tempfile.TemporaryDirectory(prefix="recserve-samplelog-", dir=Path.home()) as tmp:
        on = (("--set", 'log.backend="redis"', "--set", f'log.redis_url="{a.redis}"') if a.redis
              else ("--set", f'log.dir="{tmp}/log"')) + tuple(x for kv in a.set for x in ("--set", kv))
        off = ("--state-dir", "none", "--set", 'log.backend="off"')
        with Server(a.config, a.bundle, workers=1, log=Path(tmp) / "on.stderr",
                    extra=("--state-dir", "none", *on)) as srv_on, \
             Server(a.config, a.bundle, workers=1, log=Path(tmp) / "off.stderr", extra=off) as srv_off, \
             Server(a.config, a.bundle, workers=1, log=Path(tmp) / "off2.stderr", extra=off) as srv_aa:
            ms = measure({"logging on": srv_on.target, "logging off": srv_off.target,
                          "off again (A/A)": srv_aa.target}, requests)
            inside = _inside(srv_on.target)
        written = sum(f.stat().st_size for f in Path(tmp, "log").rglob("*.seg")) if not a.redis else 0
    backend = f"Redis streams at {a.redis}" if a.redis else f"segment files under {Path.home()}"
    print(f"Recommend, count={a.count}, {a.calls} calls to each of 3 servers (1 worker each), rotating order; "
          f"sample log: {backend}" + (f", {written / (a.calls + WARMUP) / 1024:.1f} KiB per call" if written else ""))
    print(f"{'':16} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}   {'p50 - off p50':>13} {'median(call - off call)':>24}")
    base = ms["logging off"]
    for name, v in ms.items():
        print(f"{name:16} {np.percentile(v, 50):>8.3f} {np.percentile(v, 90):>8.3f} {np.percentile(v, 99):>8.3f}   "
              f"{np.percentile(v, 50) - np.percentile(base, 50):>+13.3f} {np.median(v - base):>+24.3f}")
    print(f"inside the logging worker: {inside:.3f} ms per Recommend in the sample log (its GetStatus "
          "samplelog.recommend_us / recommend_calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
