"""The baselines `recserve eval` sets the served lists against: popularity, ItemKNN and EASE.

All three learn from the same interactions the bundle may learn from (the training rows'
first-task positives: ratings, clicks) and score every item for a user from the user's own
interactions there; the eval then takes each user's best eligible items, through the same
filters as the served lists. EASE's lambda is tuned on a validation slice of the training
part: the rank rows (model_export.dataset), scored by NDCG@20 of their positives from the
rows before them, exactly like the outer protocol one step earlier.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from model_export import i2i
from model_export.dataset import Dataset

LAMBDAS = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
EASE_MAX_ITEMS = 3000       # a dense inverse per lambda: larger catalogs keep their most interacted items
TUNE_USERS = 2000           # users scored per lambda on the validation slice
TUNE_CHUNK = 32             # of them scored at once: 2000 dense rows over a 1M-item catalog took > 18 GB
COUNT = 20
_DISCOUNT = 1.0 / np.log2(np.arange(COUNT) + 2.0)


def popularity(x: sp.csr_matrix) -> np.ndarray:
    """float32 [I]: users who interacted with each item."""
    return np.asarray(x.sum(0), np.float32).ravel()


def ndcg(scores: np.ndarray, exclude: sp.csr_matrix, positives: sp.csr_matrix) -> float:
    """Mean binary NDCG@20 of the top-scored non-excluded items against each row's positives."""
    s = np.array(scores, np.float64)
    s[exclude.toarray() > 0] = -np.inf
    top = np.argpartition(-s, COUNT - 1, axis=1)[:, :COUNT]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), 1, kind="stable"), 1)
    hit = np.take_along_axis(positives.toarray() > 0, top, 1)
    ideal = np.cumsum(_DISCOUNT)[np.minimum(np.asarray(positives.sum(1)).ravel(), COUNT).astype(int) - 1]
    return float(np.mean((hit * _DISCOUNT).sum(1) / ideal))


@dataclass
class Baselines:
    """Item-item weights and popularity from the training interactions `x` (users x items)."""

    x: sp.csr_matrix
    knn: sp.csr_matrix                   # cosine item-item, unpruned (ItemKNN with K = all)
    ease_items: np.ndarray               # the items EASE covers (all, or the most interacted)
    ease_b: np.ndarray                   # EASE's B over ease_items
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(cls, ds: Dataset, rows: np.ndarray, tune_rows: np.ndarray, tune_positives: np.ndarray,
            seed: int = 0) -> "Baselines":
        """`rows`: the interactions the baselines learn from; `tune_rows` / `tune_positives`: the
        training slice before the validation slice and the validation slice's positive rows."""
        t0 = time.time()
        pos = ds.log_labels[:, 0] > 0

        def matrix(r: np.ndarray) -> sp.csr_matrix:
            r = r[pos[r]]
            return i2i.interactions(ds.log_user[r], ds.log_item[r], ds.n_users, ds.n_items)

        x = matrix(rows)
        pop = popularity(x)
        items = np.argsort(-pop, kind="stable")[:EASE_MAX_ITEMS]
        items = np.sort(items[pop[items] > 0])
        lam, grid = _tune(matrix(tune_rows), ds, tune_positives, items, seed)
        info = {"interactions": int(x.nnz), "ease": {"lambda": lam, "items": int(items.size),
                                                     "all_items": bool(items.size == int((pop > 0).sum())),
                                                     "tuning_ndcg@20": grid},
                "itemknn": {"similarity": "cosine", "neighbours": "all"}}
        b = i2i.ease(x, lam, items)
        info["seconds"] = round(time.time() - t0, 1)
        return cls(x, i2i.cosine(x), items, b.astype(np.float32), info)

    def scores(self, users: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [B, I] scores of each list for `users` (higher first); EASE's uncovered items -inf."""
        h = self.x[users]
        n = self.x.shape[1]
        ease = np.full((users.size, n), -np.inf, np.float32)
        ease[:, self.ease_items] = h[:, self.ease_items] @ self.ease_b
        return {"popularity": np.broadcast_to(popularity(self.x), (users.size, n)),
                "itemknn": np.asarray((h @ self.knn).todense(), np.float32), "ease": ease}


def _tune(x: sp.csr_matrix, ds: Dataset, positives: np.ndarray, items: np.ndarray,
          seed: int) -> tuple[float, dict[str, float]]:
    """The lambda of LAMBDAS with the best NDCG@20 on the validation slice (users with history)."""
    truth = i2i.interactions(ds.log_user[positives], ds.log_item[positives], ds.n_users, ds.n_items)
    users = np.flatnonzero((np.asarray(truth.sum(1)).ravel() > 0) & (np.asarray(x.sum(1)).ravel() > 0))
    if users.size == 0:
        return LAMBDAS[len(LAMBDAS) // 2], {}
    users = np.sort(np.random.default_rng(seed).permutation(users)[:TUNE_USERS])
    h = x[users]
    grid = {}
    for lam in LAMBDAS:
        b = i2i.ease(x, lam, items)
        total = 0.0
        for lo in range(0, users.size, TUNE_CHUNK):      # dense [users, catalog] rows, a chunk at a time
            hc = h[lo:lo + TUNE_CHUNK]
            s = np.full((hc.shape[0], x.shape[1]), -np.inf, np.float32)
            s[:, items] = hc[:, items] @ b
            total += ndcg(s, hc, truth[users[lo:lo + TUNE_CHUNK]]) * hc.shape[0]
        grid[str(lam)] = total / users.size
    best = max(grid, key=grid.get)
    return float(best), grid
