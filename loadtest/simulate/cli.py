"""`recserve simulate`: the closed loop, frozen bundle against streamed bundle, over one world.

Time scale: the users set it. `simulate.active_users` are online and each asks for a list
`user_rpm` times per simulated minute; the machine serves `qps` calls per wall second to each
arm, so a simulated minute lasts active_users * user_rpm / qps wall seconds. The loop's own
latencies (join window, joiner commits, training, export, validation, hot swap) run in wall
time and are not scaled, nor is the feature store's clock (item ages, hot-score decay); a
shorter simulated minute gives the trainer fewer samples and fewer versions per simulated minute.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

BUILD_SECTIONS = ("data", "train", "index")


def build_keys(sets: list[str]) -> list[str]:
    """The --set overrides that would change the bundle (the simulator serves a built one)."""
    return [s for s in sets if s.split("=", 1)[0].split(".", 1)[0].strip() in BUILD_SECTIONS]


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path,
                   help="the world and serving config; its [simulate], [stream] and [join] apply")
    p.add_argument("--minutes", type=float, help="simulated minutes to run")
    p.add_argument("--out", required=True, type=Path, help="new folder: simulate.json, simulate.png, the arms' files")
    p.add_argument("--bounds", action="store_true",
                   help="no servers: serve the base bundle in process to the drifted world's users with perfect "
                        "history, id rows or item counters, to see what bounds recovery (bounds.json)")
    p.add_argument("--bundle", type=Path, default=None,
                   help="bundle root to start both arms from (default bundles/<config name>, built if missing)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the simulator and every process it starts, e.g. --set "
                        "simulate.qps=10 --set stream.publish_s=20 (not the build sections)")


def run_simulate(args: argparse.Namespace) -> int:
    from engine.core.bundle import load_bundle
    from engine.core.config import load_config
    from engine.core.sections import DataConfig
    from loadtest.simulate.arms import start_arm
    from loadtest.simulate.driver import Driver
    from loadtest.simulate.plot import plot
    from loadtest.simulate.report import summarise
    from loadtest.simulate.summary import markdown
    from loadtest.simulate.world import Seen, SimWorld
    from model_export.build import build_bundle
    from model_export.data import load_dataset

    bad = build_keys(args.set)
    if bad:
        print(f"recserve simulate: --set {bad[0]}: a build key; edit the config instead", file=sys.stderr)
        return 2
    if args.out.exists() and any(args.out.iterdir()):
        print(f"recserve simulate: {args.out}: exists and is not empty", file=sys.stderr)
        return 2
    if not args.bounds and (args.minutes is None or args.minutes <= 0):
        print("recserve simulate: --minutes M (> 0) simulated minutes to run, or --bounds", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.set)
    sc = cfg.simulate
    base = build_bundle(load_config(args.config), args.bundle or Path("bundles") / args.config.stem)
    bundle = load_bundle(base)
    ds = load_dataset(DataConfig(**bundle.manifest["config"]["data"]))
    rerank = next(n for n in cfg.pipeline.stages if cfg.stage[n][0] == "rerank_beam")
    world = SimWorld(ds, cfg.stage[rerank][1], sc.active_users, sc.seed, sc.shift_share)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.bounds:
        from loadtest.simulate.bounds import bounds

        report = bounds(cfg, bundle, world)
        (args.out / "bounds.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
        return 0
    config = args.config.absolute()
    minutes = int(np.ceil(args.minutes))
    wall = args.minutes * sc.minute_s
    drift_s = sc.drift_at * wall
    load0 = os.getloadavg()
    arms = []
    try:
        for name, streaming in (("frozen", False), ("streaming", True)):
            arms.append(start_arm(name, base, args.out.absolute(), config, args.set, streaming, sc.window_s,
                                  sc.commit_s))
        from loadtest.target import ProcProbe

        probe = ProcProbe([a.server.pid for a in arms] + [p.pid for a in arms for p in a.procs.values()])
        driver = Driver(world, [a.server.target for a in arms],
                        [Seen(bundle.state.user_seen, cfg.serving.seen_window) for _ in arms],
                        bundle.item_ids, sc.qps, sc.threads, sc.count, sc.seed)
        drift: dict = {}
        shown = [-1]

        def tick(elapsed: float) -> None:
            for a in arms:
                a.check()
            if elapsed >= drift_s and not world.drifted:
                drift.update(world.drift(sc.launch_quality))
                print(f"simulate: minute {elapsed / sc.minute_s:.1f}: the world drifts ({drift['shifted_users']} users "
                      f"shift interests, {drift['launched_items']} new items launch)", flush=True)
            m = int(elapsed // sc.minute_s)
            if m != shown[0]:
                shown[0] = m
                print(f"simulate: minute {m}/{minutes}, {len(driver.records)} lists served", flush=True)

        t0 = time.time()
        probe.start()
        print(f"simulate: {args.minutes:g} simulated minutes of {sc.minute_s:g} s, drift at minute "
              f"{drift_s / sc.minute_s:.1f}, {sc.qps:g} calls/s per arm", flush=True)
        driver.run(wall, tick)
        cpu = probe.stop()
    finally:
        for a in reversed(arms):
            a.stop()
    load1 = os.getloadavg()
    streaming_arm = arms[1]
    report = {
        "config": str(args.config), "sets": args.set,
        "world": {"dataset": ds.name, "users": ds.n_users, "items": ds.n_items, "base_version": base.name},
        "time_scale": {"minute_s": sc.minute_s, "simulated_minutes": args.minutes, "wall_seconds": wall,
                       "active_users": sc.active_users, "user_rpm": sc.user_rpm,
                       "note": "a simulated minute: each online user asks for user_rpm lists; it lasts "
                               "active_users * user_rpm / qps wall seconds; the loop's latencies and the feature "
                               "clock run in wall time"},
        "drift": {"minute": drift_s / sc.minute_s, "shift_share": sc.shift_share,
                  "launch_quality": sc.launch_quality, **drift},
        "loop": {"join_window_s": sc.window_s, "join_commit_s": sc.commit_s, "stream": vars(cfg.stream)},
        "simulate": {k: getattr(sc, k) for k in vars(sc)},
        "load": {"qps_per_arm": sc.qps, "threads": sc.threads, "loadavg_before": load0, "loadavg_after": load1,
                 "arm_processes": cpu, "errors": driver.errors},
        **summarise(driver.records, [a.name for a in arms], t0, sc.minute_s, minutes, drift_s / sc.minute_s,
                    streaming_arm.joined, streaming_arm.root),
    }
    (args.out / "simulate.json").write_text(json.dumps(report, indent=1, default=float))
    (args.out / "simulate.md").write_text(markdown(report))
    plot(report, args.out / "simulate.png")
    _print(report)
    print(f"report: {args.out / 'simulate.json'}, {args.out / 'simulate.md'}, {args.out / 'simulate.png'}")
    return 0


def _print(r: dict) -> None:
    f = r["freshness"]
    print(f"freshness p50 {f['p50_s']:.1f} s, p90 {f['p90_s']:.1f} s over {f['events']} events (not fresh: "
          f"{f['not_fresh']}); {len(r['versions'])} versions published, {len(r['refused'])} refused")
    for name, a in r["arms"].items():
        print(f"{name}: pre-drift utility_norm {a['pre_drift_utility_norm']:.3f}, dip to {a['dip_ratio']:.2f} of it, back "
              f"to 80% to stay {a['recovered_after_minutes']} minutes after the drift (of {a['post_drift_minutes']})")
    d = r.get("pre_drift_difference")
    if d:
        print(f"pre-drift streaming - frozen: {d['mean']:+.4f} +- {d['se']:.4f} (se, {d['pairs']} pairs)")
