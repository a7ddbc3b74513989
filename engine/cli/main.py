"""`recserve` command line: one subcommand per job, each with its own --help."""
from __future__ import annotations

import argparse
import sys


def _build(args) -> int:
    from engine.core.config import load_config
    from model_export.build import build_bundle

    cfg = load_config(args.config)
    path = build_bundle(cfg, args.out, force=args.force)
    print(f"bundle ready: {path}")
    return 0


def _data_fetch(args) -> int:
    from model_export.movielens import TERMS, fetch_movielens_100k

    path = fetch_movielens_100k(args.cache_dir)
    print(TERMS)
    print(f"movielens-100k ready in {path}")
    return 0


def _data_export(args) -> int:
    from engine.core.config import load_config
    from engine.core.sections import DataConfig
    from model_export.data import load_dataset
    from model_export.files_export import export_dataset

    if bool(args.dataset) == bool(args.config):
        print("recserve data export: name a data set (movielens-100k) or --config C (its [data] section)",
              file=sys.stderr)
        return 2
    data = load_config(args.config).data if args.config else DataConfig(source="movielens")
    ds = load_dataset(data)
    paths = export_dataset(ds, args.out, args.format)
    print(f"{ds.name}: {len(ds.log_user)} interactions, {ds.n_items} items, {ds.n_users} users -> "
          + ", ".join(str(p) for p in paths))
    print(f'build from it with [data] source = "files", files_dir = "{args.out}" (docs/data.md)')
    return 0


def _check_config(args) -> int:
    from engine.core.config import load_config

    cfg = load_config(args.config)
    print(f"{args.config}: ok ({len(cfg.pipeline.recall)} recall routes, "
          f"{len(cfg.pipeline.stages)} stages, {len(cfg.experiments)} experiments)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="train what is missing, export to ONNX, write a versioned bundle")
    b.add_argument("--config", required=True, help="TOML config (configs/tiny.toml, default.toml, large.toml)")
    b.add_argument("--out", required=True, help="bundle root; versions are written under it")
    b.add_argument("--force", action="store_true", help="rebuild even if a bundle for this config exists")
    b.set_defaults(func=_build)

    c = sub.add_parser("check-config", help="load and validate a config, then exit")
    c.add_argument("config")
    c.set_defaults(func=_check_config)

    from engine.app.client import (add_events_args, add_recommend_args, add_reload_args, main_events,
                                   main_recommend, main_reload)
    from model_export.evaluate import add_eval_args, run_eval
    from model_export.eval_diff import add_eval_diff_args, run_eval_diff
    from engine.app.server import add_serve_args, serve
    from loadtest.cli import add_loadtest_args, run_loadtest
    from model_export.join_cli import add_join_args, run_join
    from model_export.stream.cli import add_train_args, run_train
    from loadtest.simulate.cli import add_simulate_args, run_simulate
    from engine.cli.arms import add_arms_args, main_arms
    from engine.cli.tune import add_tune_args, run_tune
    from loadtest.simulate.tune_run import add_simulate_tune_args, run_simulate_tune

    for name, help_text, add_args, run in (
        ("serve", "serve a bundle over gRPC (health, reflection, metrics, hot reload)", add_serve_args, serve),
        ("recommend", "ask a server for a list and print it as a table", add_recommend_args, main_recommend),
        ("events", "send events (impression, click, like, finish, dislike) to a server", add_events_args,
         main_events),
        ("reload", "load a bundle version on the server now and publish it in CURRENT", add_reload_args,
         main_reload),
        ("arms", "show the experiment arms a server runs, or replace them (--file, --clear) without a restart",
         add_arms_args, main_arms),
        ("tune", "tune the fusion weights online: cross-entropy search over small traffic arms, promotion "
         "to control behind a confidence check", add_tune_args, run_tune),
        ("simulate-tune", "the tuner in the closed-loop simulator: control from poor weights, truth per round, "
         "against an offline grid", add_simulate_tune_args, run_simulate_tune),
        ("eval", "offline quality report of a bundle against baselines (and the oracle or held-out positives)",
         add_eval_args, run_eval),
        ("eval-diff", "two eval reports of one change on the same users: after - before per list, with a paired "
         "interval", add_eval_diff_args, run_eval_diff),
        ("loadtest", "closed/open-loop load, SLO sweep, reports and plots", add_loadtest_args, run_loadtest),
        ("join", "join the sample log's impressions to their events: labelled samples with offsets", add_join_args,
         run_join),
        ("train", "streaming trainer: joined samples -> validated bundle versions (--follow to keep going)",
         add_train_args, run_train),
        ("simulate", "closed loop: synthetic users against a frozen and a streaming arm, with a drift",
         add_simulate_args, run_simulate),
    ):
        sp = sub.add_parser(name, help=help_text)
        add_args(sp)
        sp.set_defaults(func=run)

    d = sub.add_parser("data", help="obtain real data sets, convert them to the files format")
    dsub = d.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="download a data set into the local cache (never into the repo)")
    f.add_argument("dataset", choices=["movielens-100k"])
    f.add_argument("--cache-dir", default=None, help="default: ~/.cache/recserve (or $RECSERVE_CACHE)")
    f.set_defaults(func=_data_fetch)
    x = dsub.add_parser("export", help="write a data set in the files format (data.source = \"files\", docs/data.md)")
    x.add_argument("dataset", nargs="?", choices=["movielens-100k"], help="MovieLens from the fetch cache")
    x.add_argument("--config", default=None, help="or: the data set a config's [data] section names")
    x.add_argument("--out", required=True, help="folder for interactions, items and users")
    x.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    x.set_defaults(func=_data_export)
    return p


def main(argv: list[str] | None = None) -> int:
    from engine.core.errors import BundleError, ConfigError

    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, BundleError) as e:
        print(f"recserve: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
