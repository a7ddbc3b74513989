"""Helpers both backends use to build answers from state arrays."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from engine.core.bundle import Bundle
from engine.core.context import UserFeatures


def state_user(a: Mapping[str, np.ndarray], index: int, profile: np.ndarray) -> UserFeatures:
    """A known user's features from state arrays (embedded store, Redis fallback)."""
    return UserFeatures(index, profile[None], a["user_recent"][index][None].copy(), a["user_seen"][index].copy(),
                        float(a["user_n_imp"][index]), float(a["user_n_pos"][index]))


def new_user(profile: np.ndarray, recent_len: int, seen_len: int) -> UserFeatures:
    return UserFeatures(-1, profile[None], np.full((1, recent_len), -1, np.int32),
                        np.full(seen_len, -1, np.int32), 0.0, 0.0)


def top_hot(hot: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the `n` largest entries of `hot`, best first, and their values."""
    n = min(n, hot.size)
    top = np.argpartition(-hot, n - 1)[:n] if n < hot.size else np.arange(hot.size)
    top = top[np.argsort(-hot[top], kind="stable")]
    return top.astype(np.int32), np.asarray(hot[top], np.float64)


def catalog_id(bundle: Bundle) -> str:
    """What live state is keyed by: the item and user id tables and the ring sizes. A new
    model bundle over the same catalog keeps the state (events since the last bundle)."""
    files, st = bundle.manifest["files"], bundle.state
    return (f"{files['tables/item_ids.npy']['sha256']}:{files['tables/user_ids.npy']['sha256']}"
            f":{st.user_recent.shape[1]}:{st.user_seen.shape[1]}")

