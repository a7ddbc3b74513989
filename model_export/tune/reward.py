"""What an arm earned: users' actions on its joined impressions, weighted and position-discounted.

A served list's reward is the mean over its impressions of (sum over tasks of weight x label)
x discount(position), with discount 1 / log2(2 + position) (the eval's DCG discount), or 1.
The list, not the impression, is the unit of the statistics: impressions of one list share a
user and a moment, so they are not independent. Joined rows are deduplicated per (request_id,
item_id), keeping the last: a correction (a positive that arrived after its negative was
emitted) replaces the negative.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from scipy import stats

DISCOUNTS = ("log2", "none")


@dataclass(frozen=True)
class RewardSpec:
    weights: dict[str, float] = field(default_factory=lambda: {"click": 1.0, "like": 0.5, "finish": 0.5})
    discount: str = "log2"

    def __post_init__(self) -> None:
        if self.discount not in DISCOUNTS:
            raise ValueError(f"discount: '{self.discount}' is not one of {', '.join(DISCOUNTS)}")
        if not self.weights:
            raise ValueError("reward weights: name at least one action")


@dataclass(frozen=True)
class Lists:
    """One row per served list: its experiment, server time, reward, impressions and user."""
    experiment: np.ndarray
    time: np.ndarray
    reward: np.ndarray
    impressions: np.ndarray
    user: np.ndarray

    def select(self, mask: np.ndarray) -> "Lists":
        return Lists(*(getattr(self, f)[mask] for f in FIELDS))

    @staticmethod
    def concat(parts: list["Lists"]) -> "Lists":
        if not parts:
            return Lists(np.array([], object), np.array([]), np.array([]), np.array([], np.int64), np.array([], object))
        return Lists(*(np.concatenate([getattr(p, f) for p in parts]) for f in FIELDS))


FIELDS = ("experiment", "time", "reward", "impressions", "user")


def list_rewards(table: pa.Table, spec: RewardSpec) -> Lists:
    """Joined rows -> per-list rewards (rows of lists cut by a commit boundary are counted per part)."""
    if table.num_rows == 0:
        return Lists.concat([])
    missing = [k for k in spec.weights if f"label_{k}" not in table.column_names]
    if missing:
        raise ValueError(f"reward weights: no label column for {missing} in the joined samples")
    rid = np.asarray(table.column("request_id").to_pylist(), object)
    item = np.asarray(table.column("item_id").to_pylist(), object)
    key = np.char.add(np.char.add(rid.astype(str), "\0"), item.astype(str))
    _, last = np.unique(key[::-1], return_index=True)         # the last row of each impression
    keep = np.sort(rid.size - 1 - last)
    pos = table.column("position").to_numpy()[keep].astype(np.float64)
    value = sum(w * table.column(f"label_{k}").to_numpy()[keep].astype(np.float64) for k, w in spec.weights.items())
    if spec.discount == "log2":
        value = value / np.log2(2.0 + pos)
    lists, inv = np.unique(rid[keep], return_inverse=True)
    n = np.bincount(inv, minlength=lists.size)
    total = np.bincount(inv, weights=value, minlength=lists.size)
    first = np.full(lists.size, -1)
    first[inv[::-1]] = keep[::-1]                               # a row of each list, for its experiment and time
    exp = np.asarray(table.column("experiment").to_pylist(), object)[first]
    t = table.column("time").to_numpy()[first]
    user = np.asarray(table.column("user_id").to_pylist(), object)[first]
    return Lists(exp, t, total / n, n.astype(np.int64), user)


@dataclass(frozen=True)
class Comparison:
    gain: float          # mean(a) - mean(b)
    lower: float         # one-sided lower confidence bound of the gain
    upper: float         # one-sided upper confidence bound
    n_a: int            # users on each side
    n_b: int


def clustered(reward: np.ndarray, user: np.ndarray) -> tuple[float, float, int]:
    """Mean reward per list, the variance of that mean, and the number of users.

    The salt assigns users, not lists, and a heavy user's lists in one round are alike, so the
    lists of one user form one cluster: the mean is the ratio sum(reward) / lists and its variance
    the delta method's over users (with one list per user it is the lists' own s^2 / n). Treating
    lists as independent understated the variance: on a world where every arm was as good as
    control, 28% of rounds promoted one at 90% confidence (11% with CUPED, which removes most of
    what users share).
    """
    if reward.size < 2:
        return float("nan"), float("inf"), 0
    _, inv = np.unique(user, return_inverse=True)
    y, n = np.bincount(inv, weights=reward), np.bincount(inv)
    mean, users = float(y.sum() / n.sum()), int(y.size)
    if users < 2:
        return mean, float("inf"), users
    r = y - mean * n
    return mean, float(r @ r) / float(n.sum()) ** 2 * users / (users - 1), users


def welch(a: np.ndarray, b: np.ndarray, confidence: float, users_a: np.ndarray, users_b: np.ndarray) -> Comparison:
    """One-sided Welch bounds on mean(a) - mean(b) at `confidence` (each side on its own), with
    each side's variance clustered by user (`clustered`)."""
    ma, va, na = clustered(np.asarray(a, np.float64), users_a)
    mb, vb, nb = clustered(np.asarray(b, np.float64), users_b)
    if not (np.isfinite(va) and np.isfinite(vb)):
        return Comparison(float("nan"), -np.inf, np.inf, na, nb)
    se = np.sqrt(va + vb)
    gain = ma - mb
    if se == 0:
        return Comparison(gain, gain, gain, na, nb)
    dof = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    q = float(stats.t.ppf(confidence, dof))
    return Comparison(gain, gain - q * se, gain + q * se, na, nb)
