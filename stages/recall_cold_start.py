"""Cold-start recall: young items with few impressions, matched to the user by content.

Cold items have no id signal, but their two-tower embeddings come from content (the item
tower masks ids it never trained on), so `user_e . item_e` is a content match that works
for new users too. A share of the slots is uniform exploration over the cold pool, so
every new item gets impressions and leaves the pool.

`pin` reserves list slots for young items (a fresh-content slot): of the matched ones, the
`pin` with the highest Thompson draw of their click rate (Beta posterior from the store's
counters, the CTR prior of the rankers' features) are pinned to the served list. Rankers
trained on a log that never showed a young item good bury every young item; the slot gives
them impressions, the counters learn which are good within minutes, and the draw then favours
those: what a new batch of good items needs before any model has seen it (docs/loop.md).

`nprobe` > 0 partitions the pool by the bundle index's IVF lists and scores only the pool items
in the `nprobe` lists nearest the user: on 1M items the pool is ~73k rows (9 MB of embeddings),
which a request would otherwise read whole from memory, 0.4 ms of a cache-cold product.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from engine.core.candidates import Candidates, Guarantee, ranges, rows, top_k
from engine.core.errors import ConfigError
from engine.core.featurize import CTR_PRIOR_IMP, CTR_PRIOR_POS
from engine.core.refresh import RefreshedRoute
from engine.core.registry import Policy, RouteParams, StageEnv, register


@dataclass
class Params(RouteParams):
    k: int = 300
    max_age_days: float = 3.0
    max_impressions: int = 50
    explore_share: float = 0.2
    pin: int = 0                  # young items pinned to every list (the fresh-content slot)
    nprobe: int = 0               # 0: score the whole pool; N: only its items in the N nearest IVF lists
                                  # (a flat index has no lists: the whole pool)
    refresh_s: float = 1.0

    def check(self) -> None:
        super().check()
        if self.max_age_days <= 0 or self.max_impressions < 0:
            raise ConfigError("max_age_days > 0 and max_impressions >= 0 required")
        if not 0 <= self.explore_share <= 1:
            raise ConfigError("explore_share: must be in [0, 1]")
        if not 0 <= self.pin <= self.k:
            raise ConfigError(f"pin: must be in [0, k = {self.k}]")
        if self.nprobe < 0:
            raise ConfigError("nprobe: must be >= 0 (0 scores the whole pool)")


# inline: one small matmul over the cold pool
@register("recall_cold_start", Params, recall=True, policy=Policy(inline="default"),
          reads=("ctx:user_e", "ctx:request"))
class RecallColdStart(RefreshedRoute):
    def __init__(self, p: Params, env: StageEnv):
        # Items young now or later, youngest first: time only moves forward and a bundle's
        # catalog is fixed, so the young items at any later refresh are a prefix of these, and
        # their embeddings are gathered once here instead of at every refresh (milliseconds
        # of the refresh's ~9 ms on 1M items).
        created = np.asarray(env.bundle.tables.item_created)
        cand = np.flatnonzero(created >= env.store.clock.days() - p.max_age_days)
        cand = cand[np.argsort(-created[cand], kind="stable")].astype(np.int32)
        self.cand, self.neg_created = cand, -created[cand]
        self.emb = rows(env.bundle.tables.item_emb, cand)
        self.centroids = env.models.index.centroids() if p.nprobe else None
        if self.centroids is not None:      # each item's list, as the index assigns it
            self.lists = np.concatenate([np.argmax(self.emb[i:i + 8192] @ self.centroids.T, axis=1)
                                         for i in range(0, cand.size, 8192)] or [np.empty(0, np.intp)])
        super().__init__(p, env)

    def _refresh(self) -> None:
        """The pool: the young prefix, less the items that already have their impressions; its
        embeddings contiguous (grouped by IVF list when partitioned, with each list's start), so
        a request scores the pool, or its nearest lists, in one product."""
        young = int(np.searchsorted(self.neg_created, self.p.max_age_days - self.store.clock.days(), side="right"))
        keep = np.flatnonzero(self.store.item_stats(self.cand[:young])[0] < self.p.max_impressions)
        if self.centroids is not None:
            keep = keep[np.argsort(self.lists[keep], kind="stable")]
            starts = np.searchsorted(self.lists[keep], np.arange(len(self.centroids) + 1))
            self._snap = (self.cand[keep], rows(self.emb, keep), starts)
        elif keep.size == young:        # nobody left the pool: views, no copy
            self._snap = (self.cand[:young], self.emb[:young], None)
        else:
            self._snap = (self.cand[keep], rows(self.emb, keep), None)   # one atomic swap

    def _match(self, emb: np.ndarray, starts: np.ndarray | None, u: np.ndarray, k: int):
        """Pool rows of the k best content matches for user embedding u, and their scores."""
        if starts is None:
            at = None
            sim = emb @ u
        else:                           # only the rows of the nprobe lists nearest u
            near = top_k(self.centroids @ u, self.p.nprobe)
            at = ranges(starts[near], starts[near + 1] - starts[near])
            sim = rows(emb, at) @ u
        best = top_k(sim, k)
        return (best if at is None else at[best]), sim[best]

    def __call__(self, ctx) -> Candidates:
        pool, emb, starts = self._snap
        if pool.size == 0:
            return Candidates.empty()
        n_explore = int(round(self.p.k * self.p.explore_share))
        u = ctx.user_e[0]
        best, sim = self._match(emb, starts, u, min(self.p.k - n_explore, pool.size))
        # exploration: uniform over the pool (a repeat of a matched item is merged away)
        rng = np.random.default_rng(zlib.crc32((ctx.request.request_id or ctx.request.user_id).encode()))
        explore = rng.integers(0, pool.size, n_explore)
        idx = np.concatenate([best, explore])
        guarantee = np.zeros(idx.size, np.int8)
        if self.p.pin and best.size:
            n_imp, n_pos, _ = self.store.item_stats(pool[best])
            draw = rng.beta(n_pos + CTR_PRIOR_POS, np.maximum(n_imp - n_pos, 0) + CTR_PRIOR_IMP - CTR_PRIOR_POS)
            guarantee[top_k(draw, self.p.pin)] = Guarantee.FINAL
        return Candidates.from_route(pool[idx], np.concatenate([sim, rows(emb, explore) @ u]), self.bit, guarantee)
