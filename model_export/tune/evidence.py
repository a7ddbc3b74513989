"""A pinned arm's gain over control, pooled over the rounds it ran.

Each round compares the arm with control over the same minutes (fresh users under a new salt),
so a round's gain is free of the drift everyone sees, but the level of rewards moves between
rounds; the rounds are therefore pooled as gains, inverse-variance weighted, not as one sample.
The bounds are normal (each round's gain averages hundreds of lists).
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from model_export.tune.reward import Comparison, clustered


def round_gain(arm: np.ndarray, arm_users: np.ndarray, control: np.ndarray,
               control_users: np.ndarray) -> tuple[float, float]:
    """(arm's mean - control's, its variance, clustered by user); nan gain without 2 users a side."""
    ma, va, _ = clustered(arm, arm_users)
    mb, vb, _ = clustered(control, control_users)
    if not (np.isfinite(va) and np.isfinite(vb)):
        return float("nan"), float("inf")
    return ma - mb, va + vb


def pooled(evidence: list[list[float]], confidence: float) -> Comparison:
    """One-sided bounds at `confidence` of the inverse-variance weighted gain over rounds."""
    g = np.array([e[0] for e in evidence if np.isfinite(e[0]) and e[1] > 0], np.float64)
    v = np.array([e[1] for e in evidence if np.isfinite(e[0]) and e[1] > 0], np.float64)
    if g.size == 0:
        return Comparison(float("nan"), -np.inf, np.inf, 0, 0)
    w = 1 / v
    gain, se = float((w * g).sum() / w.sum()), float(np.sqrt(1 / w.sum()))
    q = float(stats.norm.ppf(confidence))
    return Comparison(gain, gain - q * se, gain + q * se, int(g.size), int(g.size))
