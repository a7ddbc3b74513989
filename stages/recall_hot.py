"""Hot recall: time-decayed popularity, global and within the user's favourite categories.

The ranking over the whole catalog is refreshed at most every `refresh_s` (events move it
within seconds), so a request only slices precomputed lists.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core.candidates import Candidates
from engine.core.errors import ConfigError
from engine.core.refresh import RefreshedRoute
from engine.core.registry import Policy, RouteParams, StageEnv, register


@dataclass
class Params(RouteParams):
    k: int = 500
    global_share: float = 0.5      # the rest comes from the user's top categories
    categories: int = 3            # how many of the user's favourite categories
    refresh_s: float = 1.0

    def check(self) -> None:
        super().check()
        if not 0 <= self.global_share <= 1:
            raise ConfigError("global_share: must be in [0, 1]")
        if self.categories < 0 or self.refresh_s <= 0:
            raise ConfigError("categories >= 0 and refresh_s > 0 required")


# inline: slices of precomputed lists are cheaper than a thread hand-off
@register("recall_hot", Params, recall=True, policy=Policy(inline="default"), reads=("ctx:user",))
class RecallHot(RefreshedRoute):
    def __init__(self, p: Params, env: StageEnv):
        self.category = np.asarray(env.bundle.tables.item_category)
        self.n_cat = int(env.bundle.manifest["schema"]["n_categories"])
        super().__init__(p, env)

    def _refresh(self) -> None:
        """Top items by decayed score, globally and grouped by category (best first)."""
        top, hot = self.store.hot_top(max(self.p.k * 20, 20_000))   # best first
        cats = self.category[top]
        order = np.argsort(cats, kind="stable")            # by category, hot order kept inside
        bounds = np.searchsorted(cats[order], np.arange(self.n_cat + 1))
        score = np.log1p(hot).astype(np.float32)
        self._snap = (top[: self.p.k].astype(np.int32), score[: self.p.k],   # one atomic swap
                      top[order].astype(np.int32), score[order], bounds)

    def __call__(self, ctx) -> Candidates:
        g, gs, byc, bycs, b = self._snap
        n_global = int(round(self.p.k * self.p.global_share))
        parts, scores = [g[:n_global]], [gs[:n_global]]
        recent = ctx.user.recent[0]
        recent = recent[recent >= 0]
        if recent.size and self.p.categories:
            counts = np.bincount(self.category[recent], minlength=self.n_cat)
            fav = np.argsort(-counts, kind="stable")[: self.p.categories]
            fav = fav[counts[fav] > 0]
            per = (self.p.k - n_global) // max(fav.size, 1)
            for c in fav:  # at most `categories` slices, not a per-candidate loop
                lo = b[c]
                hi = min(b[c + 1], lo + per)
                parts.append(byc[lo:hi])
                scores.append(bycs[lo:hi])
        else:
            parts, scores = [g], [gs]
        return Candidates.from_route(np.concatenate(parts), np.concatenate(scores), self.bit)
