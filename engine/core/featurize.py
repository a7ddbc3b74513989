"""Model inputs, built by numpy from the bundle's tables and the feature state.

One implementation for training (model_export) and serving (stages): a feature drifting
between the two is the classic silent bug of two-stage systems. All functions are batched;
the serving path calls them with one user row and N candidate rows.

Sparse and dense apart: id embeddings live in tables (mmap'd .npy in the bundle) and are
gathered here; the ONNX graphs take only dense inputs, so one item-embedding gather serves
the two-tower score, coarse phase 2 and the fine ranker.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from engine.core.candidates import ranges, rows

COARSE_FEATURES = (
    "tt_score",         # two-tower inner product: the recall model's opinion
    "item_log_imp",     # log1p impressions: popularity
    "item_ctr",         # smoothed positive rate
    "item_age_days",    # freshness
    "item_log_hot",     # time-decayed recent positives
    "user_log_imp",
    "user_ctr",
    "cat_affinity",     # share of the user's recent positives in the item's category
    "author_affinity",  # same, for the author
    "content_sim",      # cosine of item content to the user's recent-content centroid
    "hour",
    "device",
    "i2i_score",        # the item-to-item table's score of the item given the user's recent items
)
CTR_PRIOR_POS, CTR_PRIOR_IMP = 1.0, 20.0
I2I_CHUNK = 1 << 22     # neighbour entries gathered per block when scoring many users offline


@dataclass
class I2ITable:
    """Item-to-item neighbours as CSR (built by model_export.i2i): row j holds the items whose
    score rises when a user interacted with j, and by how much."""

    indptr: np.ndarray          # int64 [I + 1]
    indices: np.ndarray         # int32 [nnz]
    weights: np.ndarray         # float32 [nnz]
    decay: float                # the user's r-th most recent item (r = 0: the latest) weighs decay ** r

    @property
    def n_items(self) -> int:
        return len(self.indptr) - 1


@dataclass
class I2IScores:
    """The i2i scores of one or more users: the recency-weighted union of the neighbours of each
    user's recent items, as sorted keys (user row * n_items + item) and their summed weights."""

    keys: np.ndarray            # int64, sorted
    scores: np.ndarray          # float32
    n_items: int

    def lookup(self, items: np.ndarray, rows: np.ndarray | int = 0) -> np.ndarray:
        """float32 scores of (row, item) pairs; 0 for an item no recent item neighbours."""
        q = np.asarray(rows, np.int64) * self.n_items + items
        if self.keys.size == 0:
            return np.zeros(q.shape, np.float32)
        at = np.minimum(np.searchsorted(self.keys, q), self.keys.size - 1)
        return np.where(self.keys[at] == q, self.scores[at], np.float32(0)).astype(np.float32)

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One user's (row 0) k best items with a positive score, best first, and their scores."""
        pos = np.flatnonzero(self.scores > 0)
        if pos.size > k:
            pos = pos[np.argpartition(-self.scores[pos], k - 1)[:k]]
        pos = pos[np.argsort(-self.scores[pos], kind="stable")]
        return (self.keys[pos] % self.n_items).astype(np.int32), self.scores[pos]


@dataclass
class Tables:
    """The sparse side: per-id arrays gathered per request. Rows may be mmap'd."""

    item_emb: np.ndarray        # float32 [I, d] two-tower item embeddings, L2-normalised
    item_id_emb: np.ndarray     # float32 [I, id_dim] id table pooled over a user's history
    item_category: np.ndarray   # int32 [I]
    item_author: np.ndarray     # int32 [I]
    item_content: np.ndarray    # float32 [I, C] (L2-normalised)
    item_created: np.ndarray    # float32 [I] day
    user_id_emb: np.ndarray     # float32 [U, id_dim]
    user_profile: np.ndarray    # int32 [U, P]
    profile_cardinality: tuple[int, ...]
    context_cardinality: tuple[int, ...]
    i2i: I2ITable | None = None     # None: the bundle has no table and every i2i score is 0

    @property
    def default_profile(self) -> np.ndarray:
        """A new user's profile: every field at 0 ("unknown" bucket)."""
        return np.zeros(len(self.profile_cardinality), np.int32)


def one_hot(codes: np.ndarray, cardinality: tuple[int, ...]) -> np.ndarray:
    """[B, F] ints -> [B, sum(cardinality)] float32, out-of-range codes clipped."""
    codes = np.atleast_2d(codes)
    top, offsets, width = _one_hot_layout(tuple(cardinality))
    out = np.zeros((codes.shape[0], width), np.float32)
    out[np.arange(codes.shape[0])[:, None], np.clip(codes, 0, top) + offsets] = 1.0
    return out


@functools.lru_cache(maxsize=64)
def _one_hot_layout(cardinality: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int]:
    """Largest code, column offset per field and width: per schema, not per request."""
    card = np.asarray(cardinality, np.int64)
    return card - 1, np.concatenate(([0], np.cumsum(card[:-1]))), int(card.sum())


def pooled(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mean of table rows over the valid (>= 0) ids of each row of `ids` [B, L] -> [B, dim]."""
    mask = ids >= 0
    rows = table[np.where(mask, ids, 0)] * mask[..., None]
    return rows.sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)


def user_tower_input(t: Tables, users: np.ndarray, profiles: np.ndarray, contexts: np.ndarray,
                     recent: np.ndarray) -> np.ndarray:
    """Dense user-tower input [B, Du]: id embedding (zeros for new users), profile, context, history
    (mean id embedding and mean content of the recent positives: the content mean still says
    something when those items are too new to have id rows)."""
    uid = np.where((users >= 0)[:, None], t.user_id_emb[np.maximum(users, 0)], 0.0)
    has_hist = (recent[:, :1] >= 0).astype(np.float32)
    return np.concatenate([uid, one_hot(profiles, t.profile_cardinality),
                           one_hot(contexts, t.context_cardinality),
                           pooled(t.item_id_emb, recent), pooled(t.item_content, recent), has_hist],
                          axis=1).astype(np.float32)


def user_tower_dim(id_dim: int, content_dim: int, profile_card, context_card) -> int:
    return 2 * id_dim + content_dim + int(sum(profile_card)) + int(sum(context_card)) + 1


def i2i_scores(table: I2ITable | None, recent: np.ndarray) -> I2IScores:
    """The i2i scores of B users from their recent items [B, L] (most recent first, -1 padded):
    sum over r of decay**r * row(recent[b, r]) of the table. Vectorised over every (user, recent
    item, neighbour) entry, at most L x K per user (K: the table's width)."""
    n_items = table.n_items if table is not None else 0
    if table is None or recent.size == 0:
        return I2IScores(np.empty(0, np.int64), np.empty(0, np.float32), n_items)
    b, r = np.nonzero(recent >= 0)
    j = recent[b, r]
    start = table.indptr[j]
    n = table.indptr[j + 1] - start
    pos = ranges(start, n)
    keys = np.repeat(b.astype(np.int64) * n_items, n) + table.indices[pos]
    w = np.repeat(np.float32(table.decay) ** r.astype(np.float32), n) * table.weights[pos]
    uniq, inv = np.unique(keys, return_inverse=True)
    return I2IScores(uniq, np.bincount(inv, weights=w, minlength=uniq.size).astype(np.float32), n_items)


def i2i_pairs(table: I2ITable | None, recent: np.ndarray, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
    """float32 [N] i2i scores of N (row, item) pairs, row indexing `recent` [B, L]: the offline
    (training) form of `i2i_scores(...).lookup`, in blocks of users so memory stays bounded."""
    out = np.zeros(items.shape, np.float32)
    if table is None or items.size == 0:
        return out
    width = max(int(np.diff(table.indptr).max(initial=0)) * recent.shape[1], 1)
    per = max(I2I_CHUNK // width, 1)
    order = np.argsort(rows, kind="stable")
    users = np.unique(rows)
    for s in range(0, users.size, per):
        block = users[s:s + per]
        lo, hi = np.searchsorted(rows[order], [block[0], block[-1] + 1])
        sel = order[lo:hi]
        sc = i2i_scores(table, recent[block])
        out[sel] = sc.lookup(items[sel], np.searchsorted(block, rows[sel]))
    return out


def coarse_features(t: Tables, items: np.ndarray, user_e: np.ndarray, item_e: np.ndarray,
                    recent: np.ndarray, user_n_imp: np.ndarray, user_n_pos: np.ndarray,
                    item_n_imp: np.ndarray, item_n_pos: np.ndarray, item_hot: np.ndarray,
                    contexts: np.ndarray, now: float | np.ndarray, i2i: np.ndarray) -> np.ndarray:
    """Cheap features [N, len(COARSE_FEATURES)] for N (user, item) rows.

    User-side arguments are [N, ...] or [1, ...] (broadcast over one request's candidates).
    `item_n_imp`, `item_n_pos`, `item_hot` and `i2i` (the user's i2i score of each item,
    `i2i_scores(...).lookup` or `i2i_pairs`) are already gathered for `items`.
    """
    n = items.shape[0]
    f = np.empty((n, len(COARSE_FEATURES)), np.float32)
    f[:, 0] = np.einsum("nd,nd->n", np.broadcast_to(user_e, item_e.shape), item_e)
    f[:, 1] = np.log1p(item_n_imp)
    f[:, 2] = (item_n_pos + CTR_PRIOR_POS) / (item_n_imp + CTR_PRIOR_IMP)
    f[:, 3] = np.maximum(now - t.item_created[items], 0.0)
    f[:, 4] = np.log1p(item_hot)
    f[:, 5] = np.log1p(user_n_imp)
    f[:, 6] = (user_n_pos + CTR_PRIOR_POS) / (user_n_imp + CTR_PRIOR_IMP)
    valid = recent >= 0
    n_valid = np.maximum(valid.sum(1), 1)
    if recent.shape[0] == 1:        # serving: one user's counts per category (author), looked up
        mine = recent[valid]
        f[:, 7] = _share(t.item_category[mine], t.item_category[items]) / n_valid[0]
        f[:, 8] = _share(t.item_author[mine], t.item_author[items]) / n_valid[0]
    else:                           # training: row n of `recent` belongs to item n
        rc = np.where(valid, t.item_category[np.maximum(recent, 0)], -1)
        ra = np.where(valid, t.item_author[np.maximum(recent, 0)], -1)
        f[:, 7] = (rc == t.item_category[items][:, None]).sum(1) / n_valid
        f[:, 8] = (ra == t.item_author[items][:, None]).sum(1) / n_valid
    centroid = pooled(t.item_content, recent)
    centroid /= np.maximum(np.linalg.norm(centroid, axis=1, keepdims=True), 1e-6)
    f[:, 9] = np.einsum("nd,nd->n", np.broadcast_to(centroid, (n, centroid.shape[1])),
                        rows(t.item_content, items))
    ctx = np.broadcast_to(contexts, (n, contexts.shape[1]))
    f[:, 10] = ctx[:, 0]
    f[:, 11] = ctx[:, 1] if ctx.shape[1] > 1 else 0
    f[:, 12] = i2i
    return f


def _share(recent_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """How many of one user's recent items have each of `codes` (a category or author per
    candidate, codes >= 0): the [N, L] comparison as one gather from the user's count per code
    (a bincount as long as the largest code: 7x cheaper than a search of the distinct codes)."""
    if recent_codes.size == 0 or codes.size == 0:
        return np.zeros(codes.shape, np.int64)
    return np.bincount(recent_codes, minlength=int(codes.max()) + 1)[codes]


def ranker_user_input(t: Tables, user_e: np.ndarray, profiles: np.ndarray,
                      contexts: np.ndarray) -> np.ndarray:
    """User side of phase 2 and the fine ranker [B, d + profile + context]: computed once per request."""
    return np.concatenate([user_e, one_hot(profiles, t.profile_cardinality),
                           one_hot(contexts, t.context_cardinality)], axis=1).astype(np.float32)


def ranker_user_dim(embed_dim: int, profile_card, context_card) -> int:
    """Width of `ranker_user_input`'s rows."""
    return embed_dim + int(sum(profile_card)) + int(sum(context_card))


def ranker_item_input(item_e: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Item side [N, d + F]: the shared item embedding and the cheap features (the graph normalises)."""
    return np.concatenate([item_e, coarse], axis=1).astype(np.float32)


def sequence_input(t: Tables, recent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The user's recent positives as item embeddings [B, L, d] and a float mask [B, L]."""
    mask = recent >= 0
    seq = t.item_emb[np.where(mask, recent, 0)] * mask[..., None]
    return seq.astype(np.float32), mask.astype(np.float32)


def item_tower_input(t: Tables, category_emb: np.ndarray, author_emb: np.ndarray,
                     items: np.ndarray) -> np.ndarray:
    """Dense item-tower input [N, id_dim + cat + author + C]: the id row is zero for items the
    model never trained on, so a new item embeds from category, author and content alone."""
    return np.concatenate([t.item_id_emb[items], category_emb[t.item_category[items]],
                           author_emb[t.item_author[items]], t.item_content[items]], axis=1).astype(np.float32)
