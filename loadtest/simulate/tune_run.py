"""`recserve simulate-tune`: `recserve tune` measured in the closed-loop simulator.

One real server (`recserve serve`, sample log on) starts with control on deliberately poor
weights (`--start`), a real joiner (`recserve join --follow`) joins its log, the simulated users
(loadtest.simulate.driver) ask for lists and answer them from the ground truth, and the tuner
(model_export.tune) runs rounds of arms against the server over gRPC. No trainer: the models stay
the bundle's, so what changes is the weights alone.

Measured (tune_sim.json, tune_sim.md, tune_sim.png in --out):
- the truth's best weights: an offline grid over the searched weights, each scored by serving a
  fixed user sample in process and judging the lists against the truth (tune_truth.TruthJudge);
- per round: control's weights and their true utility (the same judge, so comparable with the
  grid), control's online true utility (the lists it served that round, scored by the
  simulator), the arms' rewards, the decision, the exploration share of served lists;
- rounds and simulated minutes until control first reaches `target` x the grid optimum.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path


class _Done(Exception):
    """Raised from the driver's tick to end its run when the tuner has finished."""


def add_simulate_tune_args(p: argparse.ArgumentParser) -> None:
    from model_export.tune.args import add_evidence_args, box as _box, floats as _floats

    p.add_argument("--config", required=True, type=Path, help="world and serving config ([simulate] applies)")
    p.add_argument("--out", required=True, type=Path, help="new folder for the report and the processes' files")
    p.add_argument("--bundle", type=Path, default=None, help="bundle root (default bundles/<config name>)")
    p.add_argument("--rounds", type=int, default=12, help="tuning rounds")
    p.add_argument("--max-minutes", type=float, default=60.0, help="stop after this many simulated minutes")
    p.add_argument("--start", type=_floats, default="click=1", help="control's poor starting weights")
    p.add_argument("--reward", type=_floats, default="click=1,like=0.5,finish=0.5",
                   help="the tuner's reward per action; the truth values an item at its expectation")
    p.add_argument("--search", type=_box, default="like=0:3,finish=0:3")
    p.add_argument("--fixed", type=_floats, default="click=1")
    p.add_argument("--grid", default="0,0.25,0.5,1,2,3", help="values of each searched weight in the offline grid")
    p.add_argument("--init-std", type=float, default=0.5, help="start of the search spread, share of the box")
    p.add_argument("--min-std", type=float, default=0.05, help="floor of the search spread, in search coordinates")
    p.add_argument("--scale", choices=("log", "linear"), default="log", help="the search's scale (recserve tune)")
    p.add_argument("--surrogate", action=argparse.BooleanOptionalAction, default=True,
                   help="recentre the search on a surface fitted to every round (recserve tune)")
    p.add_argument("--arms", type=int, default=4)
    p.add_argument("--share", type=float, default=0.2, help="total traffic share of the tuner's arms")
    p.add_argument("--min-impressions", type=int, default=1000)
    p.add_argument("--confidence", type=float, default=0.9)
    add_evidence_args(p)
    p.add_argument("--judge-users", type=int, default=300, help="users in the truth judge's sample")
    p.add_argument("--target", type=float, default=0.95, help="share of the grid optimum control should reach")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the simulator and its processes, e.g. --set simulate.qps=20")


def run_simulate_tune(args: argparse.Namespace) -> int:
    from engine.app.client import RecServeClient
    from model_export.tune.args import settings
    from engine.core.arms import toml_value
    from engine.core.bundle import load_bundle
    from engine.core.config import load_config
    from engine.core.sections import DataConfig
    from loadtest.simulate.arms import arm_root, spawn
    from loadtest.simulate.cli import build_keys
    from loadtest.simulate.driver import Driver
    from loadtest.simulate.report import utility_norm
    from loadtest.simulate.tune_truth import TruthJudge, truth_params
    from loadtest.simulate.world import Seen, SimWorld
    from loadtest.target import Server
    from model_export.build import build_bundle
    from model_export.data import load_dataset
    from model_export.tune.plot import plot
    from model_export.tune.tuner import Tuner, line

    if build_keys(args.set):
        print("recserve simulate-tune: --set of a build key; edit the config instead", file=sys.stderr)
        return 2
    if args.out.exists() and any(args.out.iterdir()):
        print(f"recserve simulate-tune: {args.out}: exists and is not empty", file=sys.stderr)
        return 2
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, args.set)
    sc = cfg.simulate
    base = build_bundle(load_config(args.config), args.bundle or Path("bundles") / args.config.stem)
    bundle = load_bundle(base)
    ds = load_dataset(DataConfig(**bundle.manifest["config"]["data"]))
    world = SimWorld(ds, truth_params(args.reward), sc.active_users, sc.seed, 0.0)
    stage = "rerank"

    t0 = time.time()
    judge = TruthJudge(cfg, bundle, world, stage, args.judge_users, sc.seed)
    values = [float(v) for v in args.grid.split(",")]
    grid = judge.grid(args.fixed, {n: [v for v in values if lo <= v <= hi] for n, (lo, hi) in args.search.items()})
    best = grid["best"]["utility"]
    start_utility = judge.utility(args.start)
    print(f"simulate-tune: grid optimum {best:.4f} at {grid['best']['weights']} ({len(grid['rows'])} points, "
          f"{time.time() - t0:.0f} s); start {args.start} {start_utility:.4f} "
          f"({start_utility / best:.1%} of it)", flush=True)

    over = [a for s in args.set for a in ("--set", s)]
    home = out / "server"
    root = arm_root(base, home / "bundle")
    log_dir, joined = home / "log", home / "joined"
    server = Server(args.config.absolute(), root, workers=args.workers, log=home / "server.log",
                    extra=("--state-dir", "none", *over, "--set", f'log.dir="{log_dir}"',
                           "--set", f"stage.{stage}.weights={toml_value(args.start)}"))
    procs = {}
    rounds: list[dict] = []
    try:
        procs["join"] = spawn(home / "join.log", "join", "--config", str(args.config.absolute()), *over,
                               "--log", str(log_dir), "--out", str(joined), "--follow",
                               "--set", f"join.window_s={sc.window_s}", "--set", f"join.commit_s={sc.commit_s}")
        joined.mkdir(parents=True, exist_ok=True)
        driver = Driver(world, [server.target], [Seen(bundle.state.user_seen, cfg.serving.seen_window)],
                        bundle.item_ids, sc.qps, sc.threads, sc.count, sc.seed)
        finished = threading.Event()
        wall = args.max_minutes * sc.minute_s
        t_run = time.time()

        def tick(_elapsed: float) -> None:
            for what, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"recserve {what} exited ({p.returncode}); see {home}/{what}.log")
            if finished.is_set():
                raise _Done

        def drive() -> None:
            try:
                driver.run(wall, tick)
            except _Done:
                pass
            finally:
                finished.set()

        thread = threading.Thread(target=drive, daemon=True)
        thread.start()
        s = settings(argparse.Namespace(
            search=args.search, fixed=args.fixed, init={}, init_std=args.init_std, stage=stage, arms=args.arms,
            share=args.share,
            min_impressions=args.min_impressions, max_wait=max(60.0, 0.5 * wall), confidence=args.confidence,
            reward=args.reward, discount="log2", method="cem", min_std=args.min_std, scale=args.scale,
            surrogate=args.surrogate, seed=sc.seed, confirm_rounds=args.confirm_rounds, cuped=args.cuped,
            control=args.control or args.start))
        client = RecServeClient(server.target, timeout=30.0)

        def on_round(rec: dict) -> None:
            weights = rec["control"]["weights"] or args.start
            now_weights = tuner.state.control or args.start
            served = [r for r in list(driver.records) if rec["start"] <= r.t <= rec["end"]]
            ctl = [r for r in served if r.experiment == ""]
            rounds.append({
                "round": rec["round"], "minutes": (rec["end"] - t_run) / sc.minute_s,
                "control_weights": weights, "control_truth": judge.utility(weights),
                "after_round_weights": now_weights, "after_round_truth": judge.utility(now_weights),
                "control_online_utility": utility_norm(ctl), "lists": len(served),
                "exploration_share_lists": 1 - len(ctl) / max(len(served), 1), "decision": rec["decision"]})
            r = rounds[-1]
            print(f"{line(rec)}\nsimulate-tune: round {rec['round']} at minute {r['minutes']:.1f}: control "
                  f"{weights} true utility {r['control_truth']:.4f} ({r['control_truth'] / best:.1%} of the grid "
                  f"optimum), online {r['control_online_utility']:.4f}; next {now_weights} "
                  f"{r['after_round_truth'] / best:.1%}; arms served {r['exploration_share_lists']:.1%} of lists",
                  flush=True)

        tuner = Tuner(s, client, joined, out / "tune.json", on_round=on_round)
        tuner.run(args.rounds, stop=finished.is_set)
        finished.set()
        thread.join(60)
        client.close()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(60)
        server.stop()
    reached = next((r for r in rounds if r["after_round_truth"] >= args.target * best), None)
    report = {
        "config": str(args.config), "sets": args.set, "reward": args.reward, "start": args.start,
        "time_scale": {"minute_s": sc.minute_s, "active_users": sc.active_users, "user_rpm": sc.user_rpm,
                       "qps": sc.qps},
        "grid": grid, "start_truth": start_utility, "target": args.target,
        "tuner": {"arms": args.arms, "share": args.share, "min_impressions": args.min_impressions,
                  "confidence": args.confidence, "search": args.search, "fixed": args.fixed,
                  "init_std": args.init_std, "min_std": args.min_std, "scale": args.scale,
                  "surrogate": args.surrogate, "confirm_rounds": args.confirm_rounds, "cuped": args.cuped},
        "rounds": rounds,
        "reached": None if reached is None else {"round": reached["round"], "minutes": reached["minutes"],
                                                 "weights": reached["after_round_weights"],
                                                 "share_of_optimum": reached["after_round_truth"] / best},
        "max_exploration_share_lists": max((r["exploration_share_lists"] for r in rounds), default=0.0),
        "errors": driver.errors,
    }
    (out / "tune_sim.json").write_text(json.dumps(report, indent=1, default=float))
    plot(tuner.state.history, out / "tune_sim.png", truth=[r["control_truth"] for r in rounds])
    print(f"report: {out / 'tune_sim.json'}, {out / 'tune_sim.png'}; reached {args.target:.0%} of the optimum: "
          f"{report['reached']}")
    return 0

