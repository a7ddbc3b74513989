"""Coarse phase 2: a shallow DNN over user and item embeddings plus the cheap features,
one batched ONNX Runtime call per request (the user half is a single broadcast row)."""
from __future__ import annotations

from dataclasses import dataclass

from engine.core import featurize
from engine.core.candidates import Candidates, Guarantee
from engine.core.registry import CutParams, StageEnv, register


@dataclass
class Params(CutParams):
    keep: int = 300


def ranker_user(ctx, tables):
    """The ranker's user row, built once per request and shared by phase 2 and the fine ranker."""
    u = ctx.cache.get("ranker_user")
    if u is None:
        u = ctx.cache["ranker_user"] = featurize.ranker_user_input(tables, ctx.user_e, ctx.user.profile,
                                                                   ctx.context)
    return u


@register("rank_dnn", Params, requires=("trees",), provides=("dnn",))
class RankDnn:
    skippable = False

    def __init__(self, p: Params, env: StageEnv):
        self.keep, self.models, self.tables = p.keep, env.models, env.bundle.tables

    def __call__(self, ctx, c: Candidates) -> Candidates:
        item = featurize.ranker_item_input(c.feats["item_e"], c.feats["coarse_x"])
        score = self.models.run("coarse_dnn", {"user": ranker_user(ctx, self.tables), "item": item})
        c = c.with_columns({"dnn": score.reshape(-1)}, {"ranker_item": item}, primary="dnn")
        return c.keep_top(c.scores["dnn"], self.keep, Guarantee.COARSE)
