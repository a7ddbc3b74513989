"""`recserve arms`: show the experiment arms a server runs, or replace them from a TOML file.

The file uses the config's own format, so arms tried in a config move to a live server as they are:

    [experiments.wide_beam]              # hash order = file order
    share = 0.05
    set = { "stage.rerank.beam_width" = 8 }
    cap = true                           # optional: never more than 5% of lists (else: hash share)

    [control]                            # optional: control's own overrides (stage.* keys)
    "stage.rerank.weights" = { click = 1.0, like = 0.3 }

A top-level `salt = "..."` (before the tables) rehashes users to arms: new arms, new users.

`--clear` removes every arm (control keeps its overrides only if the file gives them).
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import grpc

from engine.app.client import _add_conn_args, _connect, _rpc_failed
from engine.core.arms import Arms, ArmSpec


def add_arms_args(p: argparse.ArgumentParser) -> None:
    _add_conn_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--file", type=Path, help="TOML with [experiments.NAME] tables and an optional [control] table")
    g.add_argument("--clear", action="store_true", help="remove every arm: all traffic to control")
    p.add_argument("--expect-version", type=int, default=None,
                   help="refuse unless this version serves now (two operators, one change)")


def read_arms_file(path: Path) -> Arms:
    """The file's arms; ValueError naming the file and the table for a malformed one."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    unknown = set(raw) - {"experiments", "control", "salt"}
    if unknown:
        raise ValueError(f"{path}: unknown table {sorted(unknown)[0]!r} (allowed: experiments, control, salt)")
    if not isinstance(raw.get("salt", ""), str):
        raise ValueError(f"{path}: salt: a string")
    arms = []
    for name, body in raw.get("experiments", {}).items():
        if not isinstance(body, dict) or set(body) - {"share", "set", "cap"}:
            raise ValueError(f"{path}: experiments.{name}: a table of share, set and cap")
        if not isinstance(body.get("cap", False), bool):
            raise ValueError(f"{path}: experiments.{name}.cap: true or false")
        arms.append(ArmSpec(name, body.get("share", 0.0), dict(body.get("set", {})), body.get("cap", False)))
    return Arms(0, tuple(arms), dict(raw.get("control", {})), raw.get("salt", ""))


def format_arms(r) -> str:
    lines = [f"arms version {r.version} (worker {r.worker_id})" + (f", salt {r.salt!r}" if r.salt else "")]
    for k, v in sorted(r.control.items()):
        lines.append(f"  control  {k} = {v}")
    lines += [f"  {a.name}  share {a.share:g}" + (" (capped)" if a.cap else "") + "".join(f"\n      {k} = {v}" for k, v in sorted(a.set.items()))
              for a in r.arms]
    if not r.arms:
        lines.append("  no arms: all traffic to control")
    return "\n".join(lines)


def main_arms(args: argparse.Namespace) -> int:
    try:
        new = read_arms_file(args.file) if args.file else (Arms() if args.clear else None)
    except ValueError as e:
        print(f"recserve arms: {e}", file=sys.stderr)
        return 2
    with _connect(args) as c:
        try:
            if new is None:
                r = c.arms()
            else:
                r = c.set_arms([(a.name, a.share, a.set, a.cap) for a in new.arms], new.control, args.expect_version,
                               new.salt)
        except grpc.RpcError as e:
            return _rpc_failed("arms", e)
    print(format_arms(r))
    if r.message and new is not None:
        print(r.message)
    return 0

