"""Behaviour state as of a time: the one code path for training features and serving features.

`snapshot(...)` folds a log into the same arrays that the feature store keeps up to date
from events at serving time, so a ranker trained on `snapshot(log, t)` sees exactly the
features the server computes after replaying the same events.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def decay(t_from, t_to, half_life_days: float):
    """2^((t_from - t_to)/half_life): what an event at `t_from` weighs in a hot score as of `t_to`.

    The one place of the decay math: the snapshot, the stores' event weights and the stores'
    rescaling of hot scores from their reference time to now all call it.
    """
    return np.exp2((np.asarray(t_from, np.float64) - t_to) / half_life_days)


@dataclass
class FeatureState:
    user_recent: np.ndarray    # int32 [U, L] last positive items, most recent first, -1 padded
    user_seen: np.ndarray      # int32 [U, S] last impressed items, most recent first, -1 padded
    user_n_imp: np.ndarray     # float32 [U]
    user_n_pos: np.ndarray     # float32 [U]
    item_n_imp: np.ndarray     # float32 [I]
    item_n_pos: np.ndarray     # float32 [I]
    item_hot: np.ndarray       # float64 [I] sum of 2^((t_event - t_ref)/half_life) over positives
    t_ref: float               # days; hot scores are relative to it
    time: float                # days; the state includes events strictly before it

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}


def last_n_per_user(users: np.ndarray, items: np.ndarray, n_users: int, n: int) -> np.ndarray:
    """[n_users, n] int32 of each user's last `n` items (rows time-ordered), most recent first."""
    out = np.full((n_users, n), -1, np.int32)
    if users.size == 0:
        return out
    order = np.argsort(users, kind="stable")  # keeps time order within a user
    u, it = users[order], items[order]
    # position of each row counted from the user's last row: 0 = most recent
    last = np.r_[np.flatnonzero(u[1:] != u[:-1]), u.size - 1]
    ends = np.repeat(last, np.diff(np.r_[-1, last]))
    back = ends - np.arange(u.size)
    keep = back < n
    out[u[keep], back[keep]] = it[keep]
    return out


def recent_before(users: np.ndarray, items: np.ndarray, pos_mask: np.ndarray, n: int) -> np.ndarray:
    """For each (time-ordered) row, the user's last `n` positive items strictly before it.

    Point-in-time history for two-tower training pairs, [rows, n] int32, -1 padded.
    """
    rows = users.size
    order = np.lexsort((np.arange(rows), users))          # by user, then time
    u, it, p = users[order], items[order], pos_mask[order]
    cum = np.cumsum(p) - p                                  # positives before each row (global)
    pos_items = it[p.astype(bool)]
    new_user = np.r_[True, u[1:] != u[:-1]]
    start_pos = cum[new_user][np.cumsum(new_user) - 1]     # positives before the user's first row
    idx = cum[:, None] - 1 - np.arange(n)[None, :]
    valid = idx >= start_pos[:, None]
    out = np.where(valid, pos_items[np.clip(idx, 0, max(pos_items.size - 1, 0))] if pos_items.size
                   else -1, -1).astype(np.int32)
    res = np.empty_like(out)
    res[order] = out
    return res


def snapshot(log_user, log_item, log_time, log_pos, n_users: int, n_items: int, t: float,
             recent_len: int, seen_len: int, half_life_days: float) -> FeatureState:
    """State from the time-ordered log rows with time < t. `log_pos`: primary-task label."""
    hi = int(np.searchsorted(log_time, t, side="left"))
    u, i, tm, p = log_user[:hi], log_item[:hi], log_time[:hi], log_pos[:hi].astype(bool)
    pos_rows = np.flatnonzero(p)
    hot = np.zeros(n_items, np.float64)
    np.add.at(hot, i[pos_rows], decay(tm[pos_rows], t, half_life_days))
    return FeatureState(
        user_recent=last_n_per_user(u[pos_rows], i[pos_rows], n_users, recent_len),
        user_seen=last_n_per_user(u, i, n_users, seen_len),
        user_n_imp=np.bincount(u, minlength=n_users).astype(np.float32),
        user_n_pos=np.bincount(u[pos_rows], minlength=n_users).astype(np.float32),
        item_n_imp=np.bincount(i, minlength=n_items).astype(np.float32),
        item_n_pos=np.bincount(i[pos_rows], minlength=n_items).astype(np.float32),
        item_hot=hot, t_ref=float(t), time=float(t),
    )
