"""`recserve train`: the streaming trainer over joined samples (once, or --follow)."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

JOINED_DEFAULT = "joined"      # <bundle root>/joined unless --joined names the joiner's --out


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, type=Path,
                   help="bundle root holding CURRENT: trained from its version's checkpoints, published into it")
    p.add_argument("--joined", type=Path, default=None,
                   help=f"the joiner's output folder (recserve join --out); default <bundle>/{JOINED_DEFAULT}")
    p.add_argument("--config", type=Path, default=None,
                   help="config whose [stream] section applies (default: the config the bundle carries)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override with a TOML value, e.g. --set stream.publish_s=10 (repeatable)")
    p.add_argument("--follow", action="store_true",
                   help="keep training and publishing as samples arrive, until SIGTERM/SIGINT; without it: "
                        "train on what is committed, publish once if there is enough, exit")


def run_train(args: argparse.Namespace) -> int:
    from engine.core.bundle import config_file
    from engine.core.config import load_config
    from model_export.stream.trainer import StreamTrainer, TrainerError

    root = args.bundle
    if not (root / "CURRENT").is_file():
        print(f"recserve train: {root}: not a bundle root (no CURRENT): the trainer publishes versions into one",
              file=sys.stderr)
        return 2
    joined = args.joined or root / JOINED_DEFAULT
    if not joined.is_dir():
        print(f"recserve train: {joined}: no joined samples there (run recserve join --out {joined}, or pass "
              "--joined)", file=sys.stderr)
        return 2
    cfg = load_config(args.config or config_file(root), args.set)
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    try:
        trainer = StreamTrainer(root, joined, cfg, follow=args.follow, out=lambda m: print(m, flush=True))
    except TrainerError as e:
        print(f"recserve train: {e}", file=sys.stderr)
        return 1
    try:
        trainer.run(stop)
    finally:
        trainer.close()
    print(f"train: stopped; published {trainer.published} version(s), serving {trainer.vdir.name}", flush=True)
    return 0
