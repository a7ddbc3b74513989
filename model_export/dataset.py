"""The data set contract every source (synthetic world, MovieLens) fills, and how its log splits.

Times are in days and the log is sorted by time. Three parts of the log play three roles:
history trains the two-tower model and the item-to-item table and builds the feature state
the rankers see; the rank rows label the rankers' training rows; the held-out (validation)
rows are scored by the build's metrics and `recserve eval`, and nothing trains on them.

Two splits (`DataConfig.split`) say which rows are which:
  global    by time: history [0, t_history), rank [t_history, t_valid), held out [t_valid, t_end).
  per_user  each user's latest `held_out` share of rows (log order) is held out; of the rest,
            each user's latest `held_out` share are the rank rows, the earlier ones history.
Either way each user has a cut per part (`Phase`): the state a request of that user sees is
the training rows (not held out) before the cut, on a clock stopped at the cut's time. The
global split cuts everyone at one time; the per-user split cuts each user at their own row.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np

SPLITS = ("global", "per_user")


class GroundTruth(Protocol):
    """The synthetic world's oracle: true per-task probabilities, unconditional per impression."""

    def probs(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """float32 [n, T] for aligned arrays of user and item indices."""

    def user_probs(self, user: int) -> np.ndarray:
        """float32 [n_items, T] for one user over the whole catalog."""


@dataclass(frozen=True)
class Phase:
    """One labelled part of the log, and per user where the state for its rows is taken.

    User u's state is the training rows before log row `cut[u]`, on a clock at `now[u]`."""

    rows: np.ndarray      # int64, sorted: the log rows of this part
    cut: np.ndarray       # int64 [n_users] the user's first row in the part (len(log) when it has none)
    now: np.ndarray       # float64 [n_users] days: the clock at the cut

    @property
    def users(self) -> np.ndarray:
        """Users with rows in this part, sorted."""
        return np.flatnonzero(self.cut < np.iinfo(np.int64).max)


@dataclass
class Dataset:
    name: str
    tasks: tuple[str, ...]              # e.g. ("click", "like", "finish"); MovieLens: ("click", "like")
    user_ids: np.ndarray                # '<U' external ids, [n_users]
    item_ids: np.ndarray                # '<U' external ids, [n_items]
    user_profile: np.ndarray            # int32 [n_users, P] categorical fields
    profile_fields: tuple[str, ...]
    profile_cardinality: tuple[int, ...]
    context_fields: tuple[str, ...]     # e.g. ("hour", "device")
    context_cardinality: tuple[int, ...]
    item_category: np.ndarray           # int32 [n_items]
    n_categories: int
    item_author: np.ndarray             # int32 [n_items]
    n_authors: int
    item_content: np.ndarray            # float32 [n_items, C]; a noisy view of the item
    item_created: np.ndarray            # float32 [n_items] day of creation (may be > t_end: not yet logged)
    log_user: np.ndarray                # int32 [N], sorted by log_time
    log_item: np.ndarray                # int32 [N]
    log_time: np.ndarray                # float32 [N] days
    log_position: np.ndarray            # int16 [N] slot shown in (position bias); 0 when unknown
    log_context: np.ndarray             # int32 [N, len(context_fields)]
    log_labels: np.ndarray              # int8 [N, T] one column per task
    t_history: float
    t_valid: float
    t_end: float
    truth: GroundTruth | None = None    # synthetic only
    # No impression log: every row is something a user did (MovieLens, a files source without
    # `position`); no row is a shown-and-skipped negative, so the rankers train on recalled
    # candidates and sampled negatives (model_export.implicit) instead of on logged impressions.
    implicit: bool = False
    split: str = "global"               # one of SPLITS
    held_out: float = 0.2               # per_user: each user's share of rows held out

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def window(self, start: float, end: float) -> np.ndarray:
        """Log rows with start <= time < end (the log is time-sorted)."""
        lo, hi = np.searchsorted(self.log_time, [start, end], side="left")
        return np.arange(lo, hi)

    @cached_property
    def valid(self) -> Phase:
        """The held-out rows and each user's cut before them."""
        return self._cut(np.ones(len(self.log_user), bool), self.t_valid)

    @cached_property
    def train_mask(self) -> np.ndarray:
        """bool [N]: rows not held out, all a bundle may learn from."""
        mask = np.ones(len(self.log_user), bool)
        mask[self.valid.rows] = False
        return mask

    @cached_property
    def rank(self) -> Phase:
        """The rows that label the rankers' training rows: the held-out part of the training rows."""
        return self._cut(self.train_mask, self.t_history)

    @cached_property
    def history_rows(self) -> np.ndarray:
        """Training rows before the rank rows: the two-tower's and the i2i table's data."""
        mask = self.train_mask.copy()
        mask[self.rank.rows] = False
        return np.flatnonzero(mask)

    def _cut(self, base: np.ndarray, t: float) -> Phase:
        """Split the `base` rows: by time at t (global) or each user's latest share (per_user)."""
        none = np.iinfo(np.int64).max
        if self.split == "global":
            lo = int(np.searchsorted(self.log_time, t, side="left"))
            rows = np.flatnonzero(base[lo:]) + lo
            cut = np.full(self.n_users, none, np.int64)
            cut[np.unique(self.log_user[rows])] = lo
            return Phase(rows, cut, np.full(self.n_users, float(t)))
        rows = np.flatnonzero(base)
        users = self.log_user[rows]
        order = np.argsort(users, kind="stable")           # by user, log order kept within a user
        count = np.bincount(users, minlength=self.n_users)
        # a user with one row keeps it for training; else round(share * n) rows, at least one
        n_held = np.where(count > 1, np.maximum(np.rint(self.held_out * count), 1), 0).astype(np.int64)
        end = np.cumsum(count)
        back = np.repeat(end, count) - 1 - np.arange(rows.size)   # 0 = the user's latest row
        held = np.sort(rows[order][back < np.repeat(n_held, count)])
        cut = np.full(self.n_users, none, np.int64)
        np.minimum.at(cut, self.log_user[held], held)
        now = np.full(self.n_users, float(self.t_end))
        has = cut < none
        now[has] = self.log_time[cut[has]]
        return Phase(held, cut, now)
