"""Coarse phase 1: a small LightGBM model over cheap features for every candidate.

It computes the cheap features (engine.core.featurize.coarse_features) once; phase 2 and the
fine ranker reuse them and the gathered item embeddings from the batch's feature columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core import featurize
from engine.core.candidates import Candidates, Guarantee, rows
from engine.core.registry import CutParams, StageEnv, register


@dataclass
class Params(CutParams):
    keep: int = 1000


@register("rank_trees", Params, reads=("ctx:user_e", "ctx:user", "ctx:context", "ctx:now", "ctx:i2i"),
          writes=("score:trees", "feat:coarse_x", "feat:item_e"))
class RankTrees:
    def __init__(self, p: Params, env: StageEnv):
        self.keep, self.models, self.store, self.tables = p.keep, env.models, env.store, env.bundle.tables

    def __call__(self, ctx, c: Candidates) -> Candidates:
        item_e = rows(self.tables.item_emb, c.item)
        n_imp, n_pos, hot = self.store.item_stats(c.item)
        x = featurize.coarse_features(
            self.tables, c.item, ctx.user_e, item_e, ctx.user.recent,
            np.float32(ctx.user.n_imp), np.float32(ctx.user.n_pos), n_imp, n_pos, hot,
            ctx.context, ctx.now, ctx.i2i.lookup(c.item))
        score = self.models.predict_trees(x)
        c = c.with_columns({"trees": score}, {"coarse_x": x, "item_e": item_e}, primary="trees")
        return c.keep_top(score, self.keep, Guarantee.COARSE)
