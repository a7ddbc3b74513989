"""`recserve eval-diff BEFORE AFTER`: two eval reports of one change, user by user.

`recserve eval` sets a bundle against baselines served in the same run; a change to the build
(a loss, a feature, a config key) is judged by two reports, one per bundle, on the same users.
Their means differ by less than the users differ among themselves, so the difference is given
with a paired bootstrap interval over those users, and reports of different users are refused.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from model_export.eval_report import headline, paired_ci

COMPARED = ("served", "ranker")       # the lists a build changes; baselines and the oracle do not


class DiffError(ValueError):
    """The two reports cannot be compared user by user: one line saying why."""


def diff(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """Per list and headline metric: both means, after - before and its 95% paired interval."""
    pb, pa = before["protocol"], after["protocol"]
    if "user_ids" not in pb or "user_ids" not in pa:
        raise DiffError("a report without user ids (written before eval-diff existed): run recserve eval again")
    if pb["user_ids"] != pa["user_ids"]:
        raise DiffError(f"the reports score different users ({pb['users']} and {pa['users']}; same --users, "
                        "--seed and data are needed)")
    rows = []
    for name in COMPARED:
        if name not in before["per_user"] or name not in after["per_user"]:
            continue
        for metric in headline(after):
            b, a = before["per_user"][name][metric], after["per_user"][name][metric]
            mean, lo, hi = paired_ci(a, b)
            rows.append({"list": name, "metric": metric, "before": sum(b) / len(b), "after": sum(a) / len(a),
                         "diff": mean, "lo": lo, "hi": hi,
                         "outcome": "better" if lo > 0 else "worse" if hi < 0 else "no difference"})
    if "consistency" in before and "consistency" in after:
        key = next(iter(after["consistency"]))
        rows.append({"list": "served vs ranker", "metric": key, "before": before["consistency"][key],
                     "after": after["consistency"][key], "diff": after["consistency"][key] - before["consistency"][key],
                     "lo": None, "hi": None, "outcome": "(no interval)"})
    return rows


def markdown(rows: list[dict[str, Any]], before: str, after: str) -> str:
    def ci(r: dict[str, Any]) -> str:
        return "" if r["lo"] is None else f"[{r['lo']:+.4f}, {r['hi']:+.4f}]"

    lines = [f"before: {before}", f"after:  {after}", "",
             "| list | metric | before | after | after - before | 95% paired CI | |", "|---|---|---:|---:|---:|---|---|"]
    lines += [f"| {r['list']} | {r['metric']} | {r['before']:.4f} | {r['after']:.4f} | {r['diff']:+.4f} | {ci(r)} "
              f"| {r['outcome']} |" for r in rows]
    return "\n".join(lines)


def add_eval_diff_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("before", help="eval.json (or its folder) of the bundle before the change")
    p.add_argument("after", help="eval.json (or its folder) of the bundle after it")


def run_eval_diff(args: argparse.Namespace) -> int:
    paths = [Path(x) / "eval.json" if Path(x).is_dir() else Path(x) for x in (args.before, args.after)]
    try:
        before, after = (json.loads(p.read_text()) for p in paths)
        print(markdown(diff(before, after), str(paths[0]), str(paths[1])))
    except (OSError, json.JSONDecodeError, DiffError) as e:
        print(f"recserve eval-diff: {e}")
        return 2
    return 0
