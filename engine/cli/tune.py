"""`recserve tune --target HOST:PORT --joined DIR --state FILE`: tune the fusion weights online.

The server must log samples (its [log]) and a joiner must be following that log into --joined
(`recserve join --follow`); the tuner owns the server's arms while it runs (it replaces any
configured experiments). Each round is logged; the state file holds the history and the PNG
(<state>.png) is redrawn after every round.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import grpc


def add_tune_args(p: argparse.ArgumentParser) -> None:
    from engine.app.client import _add_conn_args
    from model_export.tune.args import add_evidence_args, box, floats

    _add_conn_args(p)
    p.add_argument("--joined", required=True, type=Path, help="the joiner's output folder (recserve join --out)")
    p.add_argument("--state", required=True, type=Path, help="state file: created, or resumed after a restart")
    p.add_argument("--rounds", type=int, default=0, help="rounds to run (0: until interrupted)")
    p.add_argument("--search", type=box, default="like=0:3,finish=0:3", help="weights to tune and their box")
    p.add_argument("--fixed", type=floats, default="click=1", help="weights held fixed")
    p.add_argument("--init", type=floats, default="", help="start of the search mean (default: mid-box)")
    p.add_argument("--init-std", type=float, default=0.5, help="start of the spread, as a share of the box")
    p.add_argument("--min-std", type=float, default=0.05, help="floor of the spread, in search coordinates")
    p.add_argument("--scale", choices=("log", "linear"), default="log",
                   help="search log(weight + 5%% of the box) (weights act as ratios) or the weights themselves")
    p.add_argument("--surrogate", action=argparse.BooleanOptionalAction, default=True,
                   help="recentre the search on a quadratic fitted to every round's arm-vs-control gains")
    p.add_argument("--stage", default="rerank", help="the rerank stage whose weights are tuned")
    p.add_argument("--arms", type=int, default=6, help="arms per round")
    p.add_argument("--share", type=float, default=0.10, help="total traffic share of the arms")
    p.add_argument("--min-impressions", type=int, default=2000, help="joined impressions per arm before scoring")
    p.add_argument("--max-wait", type=float, default=600.0, help="seconds: score a round with what came by then")
    p.add_argument("--confidence", type=float, default=0.95, help="one-sided, for promotion and rollback")
    add_evidence_args(p)
    p.add_argument("--reward", type=floats, default="click=1,like=0.5,finish=0.5",
                   help="reward of each action on an impression")
    p.add_argument("--discount", choices=("log2", "none"), default="log2", help="position discount of the reward")
    p.add_argument("--method", choices=("cem", "es"), default="cem")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(timeout=30.0)


def run_tune(args: argparse.Namespace) -> int:
    from engine.app.client import _connect
    from model_export.tune.args import settings
    from model_export.tune.plot import plot
    from model_export.tune.tuner import Tuner

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("recserve.tune").setLevel(logging.INFO)
    png = args.state.with_suffix(".png")
    with _connect(args) as client:
        try:
            tuner = Tuner(settings(args), client, args.joined, args.state,
                          on_round=lambda _: plot(tuner.state.history, png))
            tuner.run(args.rounds)
        except ValueError as e:
            print(f"recserve tune: {e}", file=sys.stderr)
            return 2
        except grpc.RpcError as e:
            print(f"recserve tune: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"recserve tune: interrupted; {args.state} resumes the round in flight", file=sys.stderr)
            return 130
    return 0
