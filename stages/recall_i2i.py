"""Item-to-item recall: the neighbours of the user's recent items, weighted by recency.

The bundle's neighbour table (CSR, model_export.i2i: EASE's item-item weights on small
catalogs, cosine co-occurrence on large ones) is read for the user's last items from the
feature store, so an interaction reported a moment ago changes the next list. The scores are
`RequestContext.i2i`, which the rankers' i2i feature reads too: computed once per request.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.core.candidates import Candidates
from engine.core.errors import ConfigError
from engine.core.registry import Policy, RouteParams, StageEnv, register


@dataclass
class Params(RouteParams):
    k: int = 300


# inline: at most recent_len x neighbours entries, a gather and one unique (~0.3 ms at 50 x 200);
# and the value it computes is the one coarse ranking reads next on the request thread
@register("recall_i2i", Params, recall=True, policy=Policy(inline="default"), reads=("ctx:i2i",))
class RecallI2I:
    def __init__(self, p: Params, env: StageEnv):
        table = env.bundle.tables.i2i
        if table is None or table.indices.size == 0:
            raise ConfigError(f"stage.{env.name}: bundle {env.bundle.version} has no item-to-item table "
                              "(built with i2i.neighbours = 0?)")
        self.k, self.bit = p.k, env.route_bit

    def __call__(self, ctx) -> Candidates:
        items, scores = ctx.i2i.top(self.k)
        return Candidates.from_route(items, scores, self.bit)
