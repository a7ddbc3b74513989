"""The simulation's numbers, per simulated minute and over the run, from the driver's records,
the streaming arm's joined samples (where each list was committed, the joiner's counters) and
its trainer's journal (what each version was trained through, when it was published).

Freshness of an acknowledged event: from its acknowledgement to the first response served by
the first published version whose training input reached the commit holding the event's list
(a version records the offset of the last commit it trained on; a refused interval's samples
are in no version). Events in no version served by the end are counted as not yet fresh.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.simulate.driver import Served
from model_export.joined import JoinedReader
from model_export.stream.trainer import JOURNAL

RECOVERY_SHARE, RECOVERY_MINUTES = 0.8, 10
BASELINE_MINUTES = 5        # pre-drift utility: these last minutes before the drift (the first ones warm up)


def _offset(d: dict[str, Any]) -> tuple[str, int]:
    return d["segment"], d["pos"]


def joined_index(joined: Path) -> tuple[dict[str, tuple[str, int]], list[dict[str, Any]]]:
    """request_id -> offset of the commit its list was emitted in; and the commits' clocks and counters."""
    where: dict[str, tuple[str, int]] = {}
    commits = []
    for table, c in JoinedReader(joined).read():
        off = (c.offset.segment, c.offset.pos)
        if table.num_rows:
            for rid in set(table.filter(table["correction"].to_numpy(zero_copy_only=False) == False)  # noqa: E712
                           ["request_id"].to_pylist()):
                where.setdefault(rid, off)
        commits.append({"clock": c.clock, **c.counters})
    return where, commits


def journal(root: Path) -> list[dict[str, Any]]:
    p = root / JOURNAL
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def freshness(records: list[Served], where: dict[str, tuple[str, int]], entries: list[dict[str, Any]],
              first_served: dict[str, float]) -> tuple[list[tuple[float, float, int]], dict[str, int]]:
    """[(acknowledged at, freshness s, events)] and counts of the events that are not (yet) fresh."""
    published = sorted((e for e in entries if e["event"] == "published"), key=lambda e: e["seq"])
    throughs = [_offset(e["through"]) for e in published]
    skipped = [(_offset(e["after"]), _offset(e["through"])) for e in entries if e["event"] == "refused"]
    out, missing = [], defaultdict(int)
    for r in records:
        if not r.acked:
            continue
        off = where.get(r.request_id)
        if off is None:
            missing["not_joined"] += r.n_events
            continue
        if any(a < off <= b for a, b in skipped):
            missing["in_refused_interval"] += r.n_events
            continue
        k = next((k for k, t in enumerate(throughs) if t >= off), None)
        if k is None:
            missing["not_trained_yet"] += r.n_events
            continue
        first = first_served.get(published[k]["version"])
        later = [first_served[e["version"]] for e in published[k:] if e["version"] in first_served]
        if not later:
            missing["trained_not_served"] += r.n_events
            continue
        out.append((r.acked, (first if first is not None else min(later)) - r.acked, r.n_events))
    return out, dict(missing)


def _weighted_pct(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    if values.size == 0:
        return float("nan")
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, q / 100 * cum[-1])])


def utility_norm(rs: list[Served]) -> float:
    """Oracle-normalised true utility of served lists (0: a uniform list, 1: the oracle's)."""
    if not rs:
        return float("nan")
    u, o, r = (np.mean([getattr(x, f) for x in rs]) for f in ("utility", "oracle", "uniform"))
    return float((u - r) / (o - r)) if o > r else float("nan")


def summarise(records: list[Served], arms: list[str], t0: float, minute_s: float, minutes: int, drift_minute: float,
              joined: Path | None, root: Path | None) -> dict[str, Any]:
    """The report (plain JSON types)."""
    by_minute: dict[tuple[int, int], list[Served]] = defaultdict(list)
    for r in records:
        m = int((r.t - t0) // minute_s)
        if 0 <= m < minutes:
            by_minute[(r.arm, m)].append(r)
    s_arm = arms.index("streaming") if "streaming" in arms else None
    first_served: dict[str, float] = {}
    for r in records:
        if r.arm == s_arm and (r.version not in first_served or r.t < first_served[r.version]):
            first_served[r.version] = r.t
    where, commits = joined_index(joined) if joined else ({}, [])
    entries = journal(root) if root else []
    fresh, missing = freshness([r for r in records if r.arm == s_arm], where, entries, first_served)
    f_t = np.array([f[0] for f in fresh])
    f_s = np.array([f[1] for f in fresh])
    f_w = np.array([f[2] for f in fresh], np.float64)
    rows = []
    for m in range(minutes):
        row: dict[str, Any] = {"minute": m, "drifted": m >= drift_minute}
        for a, name in enumerate(arms):
            rs = by_minute[(a, m)]
            row[name] = {"requests": len(rs), "qps": len(rs) / minute_s, "utility_norm": utility_norm(rs),
                         "utility_norm_shifted": utility_norm([x for x in rs if x.shifted]),
                         "utility_norm_unshifted": utility_norm([x for x in rs if not x.shifted]),
                         "launched_per_list": float(np.mean([x.launched for x in rs])) if rs else float("nan"),
                         "oracle_launched_per_list": float(np.mean([x.oracle_launched for x in rs])) if rs
                         else float("nan"),
                         "ctr": float(np.sum([x.positives for x in rs]) / max(np.sum([x.n for x in rs]), 1)),
                         "p50_ms": float(np.median([x.ms for x in rs])) if rs else float("nan")}
            if a == s_arm and rs:
                vs = [x.version for x in rs]
                row[name]["version"] = max(set(vs), key=vs.count)
        lo, hi = t0 + m * minute_s, t0 + (m + 1) * minute_s
        if s_arm is not None:
            sel = (f_t >= lo) & (f_t < hi)
            row["streaming"]["freshness_p50_s"] = _weighted_pct(f_s[sel], f_w[sel], 50) if sel.any() else None
            row["streaming"].update(_join_rates(commits, lo, hi))
        if len(arms) == 2:
            row["diff"] = _paired(by_minute[(0, m)], by_minute[(1, m)])
        rows.append(row)
    last_before = int(np.floor(drift_minute))
    base = range(max(1, last_before - BASELINE_MINUTES), last_before)
    versions = [{"version": e["version"], "seq": e["seq"], "rows": e["rows"], "published_s": e["published_unix"] - t0,
                 "first_served_s": first_served[e["version"]] - t0 if e["version"] in first_served else None,
                 "publish_seconds": e.get("publish_seconds"), "holdout_auc": e["holdout"]["auc"]}
                for e in entries if e["event"] == "published"]
    refused = [{"time_s": e["time"] - t0, "rows": e["rows"], "reason": e["reason"]} for e in entries
               if e["event"] == "refused"]
    return {"minutes": rows, "arms": _arm_summary(rows, arms, drift_minute),
            "freshness": {"events": int(f_w.sum()), "p50_s": _weighted_pct(f_s, f_w, 50),
                          "p90_s": _weighted_pct(f_s, f_w, 90), "not_fresh": missing},
            "versions": versions, "refused": refused,
            "pre_drift_difference": _paired(*(sum((by_minute[(a, m)] for m in base), []) for a in (0, 1)))
            if len(arms) == 2 else None}


def _join_rates(commits: list[dict[str, Any]], lo: float, hi: float) -> dict[str, Any]:
    """Join and positive rate of the impressions whose window closed in [lo, hi) (commit clocks)."""
    def at(t: float) -> dict[str, Any] | None:
        before = [c for c in commits if c["clock"] < t]
        return before[-1] if before else None
    a, b = at(lo), at(hi)
    if b is None:
        return {"join_rate": None, "positive_rate": None}
    imp = b["impressions"] - (a["impressions"] if a else 0)
    if imp <= 0:
        return {"join_rate": None, "positive_rate": None}
    return {"join_rate": (b["joined"] - (a["joined"] if a else 0)) / imp,
            "positive_rate": (b["positives"] - (a["positives"] if a else 0)) / imp}


def _paired(frozen: list[Served], streaming: list[Served]) -> dict[str, float] | None:
    """Streaming minus frozen utility, normalised by the mean oracle-over-uniform span, with its
    standard error: the same user and context went to both arms at once, so the difference is
    taken call by call."""
    f = {r.pair: r for r in frozen}
    pairs = [(f[r.pair], r) for r in streaming if r.pair in f]
    if len(pairs) < 2:
        return None
    d = np.array([b.utility - a.utility for a, b in pairs])
    scale = np.mean([x.oracle - x.uniform for p in pairs for x in p])
    return {"mean": float(d.mean() / scale), "se": float(d.std(ddof=1) / np.sqrt(len(pairs)) / scale),
            "pairs": len(pairs)}


def _arm_summary(rows: list[dict[str, Any]], arms: list[str], drift_minute: float) -> dict[str, Any]:
    """Pre-drift utility (the BASELINE_MINUTES whole minutes before the drift: the first minutes
    fill the users' seen lists, and utility settles as they do), the dip after the drift, and
    the minute after the drift from which the arm stays at RECOVERY_SHARE of it or more to the
    end of the run (the target: within RECOVERY_MINUTES)."""
    out = {}
    first_after = int(np.ceil(drift_minute))
    last_before = int(np.floor(drift_minute))
    base_rows = rows[max(1, last_before - BASELINE_MINUTES):last_before]
    for name in arms:
        pre = [r[name]["utility_norm"] for r in base_rows if np.isfinite(r[name]["utility_norm"])]
        post = [r[name]["utility_norm"] for r in rows[first_after:]]
        base = float(np.mean(pre)) if pre else float("nan")
        ratio = [p / base for p in post]
        back = next((k + 1 for k in range(len(ratio)) if all(x >= RECOVERY_SHARE for x in ratio[k:])), None)
        out[name] = {"pre_drift_utility_norm": base, "baseline_minutes": [r["minute"] for r in base_rows],
                     "post_drift_ratio": ratio, "dip_ratio": min(ratio) if ratio else None,
                     "recovered_after_minutes": back,
                     "recovered_within_target": back is not None and back <= RECOVERY_MINUTES,
                     "post_drift_minutes": len(ratio)}
    return out
