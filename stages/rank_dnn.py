"""Coarse phase 2: a shallow DNN over user and item embeddings plus the cheap features,
one batched ONNX Runtime call per request (the user half is a single broadcast row,
`RequestContext.ranker_user`, which the fine ranker reuses)."""
from __future__ import annotations

from dataclasses import dataclass

from engine.core import featurize
from engine.core.candidates import Candidates, Guarantee
from engine.core.registry import CutParams, StageEnv, register


@dataclass
class Params(CutParams):
    keep: int = 300


@register("rank_dnn", Params, reads=("feat:item_e", "feat:coarse_x", "ctx:ranker_user"),
          writes=("score:dnn", "feat:ranker_item"))
class RankDnn:
    def __init__(self, p: Params, env: StageEnv):
        self.keep, self.models = p.keep, env.models

    def __call__(self, ctx, c: Candidates) -> Candidates:
        item = featurize.ranker_item_input(c.feats["item_e"], c.feats["coarse_x"])
        score = self.models.run("coarse_dnn", {"user": ctx.ranker_user, "item": item})
        c = c.with_columns({"dnn": score.reshape(-1)}, {"ranker_item": item}, primary="dnn")
        return c.keep_top(c.scores["dnn"], self.keep, Guarantee.COARSE)
