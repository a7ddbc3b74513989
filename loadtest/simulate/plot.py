"""simulate.png: true utility per simulated minute for both arms with the drift marked, and the
streaming loop's freshness and published versions below it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loadtest.simulate.report import RECOVERY_SHARE  # noqa: E402


def plot(report: dict[str, Any], out: Path) -> None:
    rows, arms = report["minutes"], list(report["arms"])
    minute_s = report["time_scale"]["minute_s"]
    drift = report["drift"]["minute"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=(2, 1))
    x = [r["minute"] + 0.5 for r in rows]
    for name, color in zip(arms, ("tab:gray", "tab:blue")):
        top.plot(x, [r[name]["utility_norm"] for r in rows], marker="o", ms=3, color=color, label=name)
        pre = report["arms"][name]["pre_drift_utility_norm"]
        top.axhline(RECOVERY_SHARE * pre, color=color, lw=0.8, ls=":",
                    label=f"{RECOVERY_SHARE:.0%} of {name}'s pre-drift utility")
    for ax in (top, bottom):
        ax.axvline(drift, color="tab:red", lw=1.2, ls="--")
    top.text(drift, top.get_ylim()[1], " drift", color="tab:red", va="top")
    top.set_ylabel("true utility (oracle-normalised)")
    top.legend(fontsize=8, loc="lower left")
    top.set_title(f"{report['world']['dataset']}: {report['time_scale']['simulated_minutes']} simulated minutes "
                  f"of {minute_s:g} s, {report['load']['qps_per_arm']:g} calls/s per arm")
    if "streaming" in arms:
        fresh = [(r["minute"] + 0.5, r["streaming"].get("freshness_p50_s")) for r in rows]
        fresh = [(m, f) for m, f in fresh if f is not None]
        if fresh:
            bottom.plot(*zip(*fresh), marker="o", ms=3, color="tab:blue", label="freshness p50 (s)")
        for v in report["versions"]:
            if v["first_served_s"] is not None:
                bottom.axvline(v["first_served_s"] / minute_s, color="tab:green", lw=0.5, alpha=0.6)
        bottom.plot([], [], color="tab:green", lw=0.5, label="a new version first served")
        bottom.set_ylabel("seconds")
        bottom.legend(fontsize=8, loc="upper left")
    bottom.set_xlabel("simulated minute")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
