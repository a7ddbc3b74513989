"""The tuning run as a PNG: each arm's and control's reward per round, and the search's mean and
spread per weight per round (mean -+ one spread mapped to weights; promotions and rollbacks marked)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot(history: list[dict], out: Path, truth: list[float] | None = None) -> None:
    """`truth`: control's true utility per round, if known (the simulator's), on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    rounds = np.array([h["round"] for h in history])
    for h in history:
        r = [a["reward"] for a in h["arms"]]
        ax.scatter(np.full(len(r), h["round"]), r, s=14, color="tab:gray", alpha=0.6)
    ax.plot(rounds, [h["control"]["reward"] for h in history], "o-", color="tab:blue", label="control")
    for h in history:
        if h["decision"].startswith(("promoted", "rolled back")):
            ax.axvline(h["round"] + 0.5, color="tab:green" if h["decision"].startswith("promoted") else "tab:red",
                       ls=":", lw=1)
    ax.scatter([], [], s=14, color="tab:gray", label="arms")
    ax.set_ylabel("reward per impression (discounted)")
    ax.legend(loc="upper left", fontsize=8)
    if truth is not None:
        tx = ax.twinx()
        tx.plot(rounds, truth, "s--", color="tab:orange", label="control true utility")
        tx.set_ylabel("true utility (oracle-normalised)")
        tx.legend(loc="lower right", fontsize=8)
    for name in history[0]["mean"]:
        m = np.array([h["mean"][name] for h in history])
        (line,) = bx.plot(rounds, m, "o-", label=f"{name} mean")
        if all("band" in h for h in history):       # the spread is in search coordinates (log scale)
            band = np.array([h["band"][name] for h in history])
            bx.fill_between(rounds, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.2)
    bx.set_xlabel("round (dotted: green promotion, red rollback, after the round)")
    bx.set_ylabel("weight")
    bx.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
