"""`make demo`: build (or reuse) a bundle, serve it, send real requests and events, load-test, stop.

Everything goes through the public surfaces a user would use: `build_bundle`, the
`recserve serve` process, the gRPC client and the load generator.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from engine.app.ready import NotReady, wait_ready
from engine.core.bundle import resolve

READY_TIMEOUT_S = 180


def _start_server(config: str, bundles: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "engine.cli.main", "serve", "--config", config, "--bundle", bundles, "--port", "0",
           "--state-dir", "none"]   # a throwaway run: no feature state left behind in the home dir
    print("$", " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        ready = wait_ready(proc, READY_TIMEOUT_S)
    except NotReady as e:
        proc.kill()
        raise SystemExit(str(e)) from None
    print(ready.line)
    return proc, ready.target


def _show(resp, title: str) -> None:
    print(f"\n{title}  (bundle {resp.bundle_version}, {resp.total_ms:.1f} ms, degraded={resp.degraded})")
    for i, it in enumerate(resp.items, 1):
        preds = " ".join(f"{k}={v:.3f}" for k, v in sorted(it.predictions.items()))
        print(f"  {i:2d}. {it.item_id:<8} score={it.score:.4f} {preds}  routes={','.join(it.routes)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/default.toml")
    p.add_argument("--bundles", default="bundles/default")
    p.add_argument("--load-seconds", type=float, default=10.0)
    a = p.parse_args(argv)

    from engine.app.client import RecServeClient
    from engine.core.config import load_config
    from model_export.build import build_bundle

    cfg = load_config(a.config)
    print(f"== 1. bundle for {a.config} -> {a.bundles}")
    vdir = build_bundle(cfg, Path(a.bundles))
    manifest = json.loads((resolve(vdir) / "manifest.json").read_text())
    for model, metrics in manifest["metrics"].items():
        print(f"  {model:<14}", "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    print(f"  index {manifest['index']['kind']}: recall@{manifest['index']['recall_k']} = "
          f"{manifest['index']['recall']:.4f}")

    print("\n== 2. serve it")
    proc, target = _start_server(a.config, a.bundles)
    try:
        with RecServeClient(target, timeout=5.0) as client:
            user = str(np.load(resolve(vdir) / "tables/user_ids.npy", mmap_mode="r")[42])
            first = client.recommend(user, count=10, debug=True)
            _show(first, f"== 3. Recommend(user={user}, count=10)")
            print("  stages:", ", ".join(f"{t.name} {t.ms:.2f}ms {t.count_in}->{t.count_out}"
                                          for t in first.trace if t.name not in ("hydrate", "merge")))
            clicked = first.items[0].item_id
            shown = [{"kind": "impression", "user_id": user, "item_id": it.item_id} for it in first.items]
            ev = client.report_events(shown + [{"kind": "click", "user_id": user, "item_id": clicked},
                                               {"kind": "click", "user_id": user, "item_id": "no-such-item"}])
            print(f"\n== 4. ReportEvents: {ev.accepted} accepted, rejected: "
                  + "; ".join(f"#{r.index} {r.reason}" for r in ev.rejected))
            again = client.recommend(user, count=10)
            overlap = {it.item_id for it in again.items} & {it.item_id for it in first.items}
            _show(again, "== 5. Recommend again: items reported as seen are gone")
            print(f"  overlap with the first list: {sorted(overlap) or 'none'}")
            _show(client.recommend("someone-new", count=5), "== 6. A user the bundle has never seen")
        print(f"\n== 7. load test ({a.load_seconds:.0f} s closed loop)")
        from loadtest.cli import demo_summary
        demo_summary(target, a.bundles, seconds=a.load_seconds, concurrency=4, server_pid=proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        print(f"\n== 8. server stopped (SIGTERM, exit {rc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
