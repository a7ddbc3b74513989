"""simulate.md: the report's headline numbers and its per-minute table, every number from the JSON."""
from __future__ import annotations

from typing import Any


def _f(v: Any, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(r: dict[str, Any]) -> str:
    ts, f, drift = r["time_scale"], r["freshness"], r["drift"]
    arms = list(r["arms"])
    d = r.get("pre_drift_difference") or {}
    lines = [
        f"# Simulation: {r['world']['dataset']}, {ts['simulated_minutes']:g} simulated minutes",
        f"Base version {r['world']['base_version']}; {ts['active_users']} users online asking {ts['user_rpm']:g} lists "
        f"a simulated minute each, {r['load']['qps_per_arm']:g} calls/s per arm: a simulated minute is "
        f"{ts['minute_s']:g} s. Drift at minute {drift['minute']:.1f}: {drift.get('shifted_users', 0)} users shift "
        f"interests, {drift.get('launched_items', 0)} items launch (quality +{drift['launch_quality']:g}). Load average "
        f"before / after: {' '.join(f'{x:.1f}' for x in r['load']['loadavg_before'])} / "
        f"{' '.join(f'{x:.1f}' for x in r['load']['loadavg_after'])}.",
        "",
        f"- freshness (event acknowledged -> first response by a model trained on it): p50 **{_f(f['p50_s'], 1)} s**, "
        f"p90 {_f(f['p90_s'], 1)} s over {f['events']} events; not (yet) fresh: {f['not_fresh']}",
        f"- versions published {len(r['versions'])}, refused {len(r['refused'])}",
        f"- pre-drift streaming - frozen (paired): {_f(d.get('mean'), 4)} +- {_f(d.get('se'), 4)} (se, "
        f"{d.get('pairs', 0)} pairs)",
    ]
    for name in arms:
        a = r["arms"][name]
        back = a["recovered_after_minutes"]
        lines.append(f"- {name}: pre-drift utility {_f(a['pre_drift_utility_norm'])} (minutes {a['baseline_minutes']}), "
                     f"lowest after the drift {_f(a['dip_ratio'])} of it, "
                     + (f"back to 80% of it, to stay, {back} minutes after the drift" if back else
                        f"not back to 80% of it to stay in the {a['post_drift_minutes']} minutes after the drift"))
    cols = ["minute"] + [f"{a} utility" for a in arms] + ["diff", "se", "version", "freshness p50 s",
                                                           "launched served / oracle", "join rate", "qps"]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m in r["minutes"]:
        s = m.get("streaming", {})
        diff = m.get("diff") or {}
        lines.append("| " + " | ".join([
            f"{m['minute']}{'*' if m['drifted'] else ''}", *(_f(m[a]["utility_norm"]) for a in arms),
            _f(diff.get("mean"), 4), _f(diff.get("se"), 4), str(s.get("version", ""))[-8:],
            _f(s.get("freshness_p50_s"), 1),
            f"{_f(s.get('launched_per_list'), 2)} / {_f(s.get('oracle_launched_per_list'), 1)}",
            _f(s.get("join_rate")), _f(s.get("qps"), 1)]) + " |")
    lines.append("")
    lines.append("`*`: after the drift. utility: oracle-normalised true utility (0 a uniform list, 1 the oracle's).")
    return "\n".join(lines) + "\n"
