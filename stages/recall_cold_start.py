"""Cold-start recall: young items with few impressions, matched to the user by content.

Cold items have no id signal, but their two-tower embeddings come from content (the item
tower masks ids it never trained on), so `user_e . item_e` is a content match that works
for new users too. A share of the slots is uniform exploration over the cold pool, so
every new item gets impressions and leaves the pool.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from engine.core.candidates import Candidates, top_k
from engine.core.errors import ConfigError
from engine.core.refresh import RefreshedRoute
from engine.core.registry import Policy, RouteParams, StageEnv, register


@dataclass
class Params(RouteParams):
    k: int = 300
    max_age_days: float = 3.0
    max_impressions: int = 50
    explore_share: float = 0.2
    refresh_s: float = 1.0

    def check(self) -> None:
        super().check()
        if self.max_age_days <= 0 or self.max_impressions < 0:
            raise ConfigError("max_age_days > 0 and max_impressions >= 0 required")
        if not 0 <= self.explore_share <= 1:
            raise ConfigError("explore_share: must be in [0, 1]")


# inline: one small matmul over the cold pool
@register("recall_cold_start", Params, recall=True, policy=Policy(inline="default"),
          reads=("ctx:user_e", "ctx:request"))
class RecallColdStart(RefreshedRoute):
    def __init__(self, p: Params, env: StageEnv):
        self.created = np.asarray(env.bundle.tables.item_created)
        self.emb = env.bundle.tables.item_emb
        super().__init__(p, env)

    def _refresh(self) -> None:
        young = np.flatnonzero(self.store.clock.days() - self.created <= self.p.max_age_days).astype(np.int32)
        pool = young[self.store.item_stats(young)[0] < self.p.max_impressions]
        self._snap = (pool, np.ascontiguousarray(self.emb[pool]))   # one atomic swap

    def __call__(self, ctx) -> Candidates:
        pool, emb = self._snap
        if pool.size == 0:
            return Candidates.empty()
        n_explore = int(round(self.p.k * self.p.explore_share))
        n_match = min(self.p.k - n_explore, pool.size)
        sim = emb @ ctx.user_e[0]
        best = top_k(sim, n_match)
        # exploration: uniform over the pool (a repeat of a matched item is merged away)
        rng = np.random.default_rng(zlib.crc32((ctx.request.request_id or ctx.request.user_id).encode()))
        idx = np.concatenate([best, rng.integers(0, pool.size, n_explore)])
        return Candidates.from_route(pool[idx], sim[idx], self.bit)
