"""What the sample log costs a Recommend: logging on and off, measured in one run.

Starts `recserve serve` on the bundle twice at once, one worker each: one writing the sample
log (files backend in a tmp folder under $HOME, or Redis streams with --redis URL), one with
`log.backend = "off"`. One client then sends the same Recommend calls to both, alternating
call by call, so both see the same machine load (other processes on this 2-core machine
come and go). Prints p50/p90/p99 per call for each and the difference of the p50s, plus what
the log wrote (records, bytes per call).

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


def _requests(bundle: Path, n: int, count: int, seed: int) -> list[pb2.RecommendRequest]:
    users = np.load(resolve(bundle) / "tables/user_ids.npy", allow_pickle=False)
    rng = np.random.default_rng(seed)
    return [pb2.RecommendRequest(user_id=str(users[u]), count=count, context={"hour": int(h)})
            for u, h in zip(rng.integers(0, users.size, n), rng.integers(0, 24, n))]


def measure(targets: dict[str, str], requests: list[pb2.RecommendRequest], warmup: int = 200) -> dict[str, np.ndarray]:
    """ms per call for each target, the calls alternating between them."""
    channels = {k: grpc.insecure_channel(t, options=OWN_CONNECTION) for k, t in targets.items()}
    stubs = {k: pb2_grpc.RecServeStub(c) for k, c in channels.items()}
    out: dict[str, list[float]] = {k: [] for k in targets}
    try:
        for i, req in enumerate(requests[:warmup] + requests):
            order = list(stubs.items()) if i % 2 == 0 else list(stubs.items())[::-1]
            for name, stub in order:
                t = time.perf_counter()
                stub.Recommend(req, timeout=30)
                if i >= warmup:
                    out[name].append((time.perf_counter() - t) * 1e3)
    finally:
        for c in channels.values():
            c.close()
    return {k: np.array(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--calls", type=int, default=3000, help="Recommend calls to each server")
    p.add_argument("--count", type=int, default=20, help="items per list")
    p.add_argument("--redis", default=None, metavar="URL", help="measure the Redis streams backend at URL instead")
    a = p.parse_args(argv)
    requests = _requests(a.bundle, a.calls, a.count, seed=0)
    with tempfile.TemporaryDirectory(prefix="recserve-samplelog-", dir=Path.home()) as tmp:
        on = (("--set", 'log.backend="redis"', "--set", f'log.redis_url="{a.redis}"') if a.redis
              else ("--set", f'log.dir="{tmp}/log"'))
        with Server(a.config, a.bundle, workers=1, log=Path(tmp) / "on.stderr",
                    extra=("--state-dir", "none", *on)) as srv_on, \
             Server(a.config, a.bundle, workers=1, log=Path(tmp) / "off.stderr",
                    extra=("--state-dir", "none", "--set", 'log.backend="off"')) as srv_off:
            ms = measure({"logging on": srv_on.target, "logging off": srv_off.target}, requests)
        written = sum(f.stat().st_size for f in Path(tmp, "log").rglob("*.seg")) if not a.redis else 0
    backend = f"Redis streams at {a.redis}" if a.redis else f"segment files under {Path.home()}"
    print(f"Recommend, count={a.count}, {a.calls} calls to each server (1 worker each), alternating; "
          f"sample log: {backend}")
    print(f"{'':14} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for name, v in ms.items():
        print(f"{name:14} {np.percentile(v, 50):>8.3f} {np.percentile(v, 90):>8.3f} {np.percentile(v, 99):>8.3f}")
    d = np.percentile(ms["logging on"], 50) - np.percentile(ms["logging off"], 50)
    print(f"p50 difference: {d:+.3f} ms" + (f"; log written: {written / (a.calls + 200) / 1024:.1f} KiB per call"
                                            if written else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
