"""The data set contract every source (synthetic world, MovieLens) fills.

Times are in days; the log is sorted by time and split by time into three windows:
history [0, t_history) trains the two-tower model and builds the feature state the rankers
see; ranker [t_history, t_valid) trains the rankers; validation [t_valid, t_end].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class GroundTruth(Protocol):
    """The synthetic world's oracle: true per-task probabilities, unconditional per impression."""

    def probs(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """float32 [n, T] for aligned arrays of user and item indices."""

    def user_probs(self, user: int) -> np.ndarray:
        """float32 [n_items, T] for one user over the whole catalog."""


@dataclass
class Dataset:
    name: str
    tasks: tuple[str, ...]              # e.g. ("click", "like", "finish"); MovieLens: ("like",)
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
    implicit: bool = False              # no impression log: every row is something a user did (MovieLens, a
                                        # files source without `position`); no row is a shown-and-skipped negative

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
