"""ANN recall: the two-tower user embedding searched against the faiss index of item embeddings.

It runs on the pool by default (faiss releases the GIL); on a small in-process index it is
cheaper on the request thread (`inline = true`, see BENCHMARKS.md)."""
from __future__ import annotations

from dataclasses import dataclass

from engine.core.candidates import Candidates
from engine.core.registry import Policy, RouteParams, StageEnv, register


@dataclass
class Params(RouteParams):
    k: int = 2000
    timeout_ms: float = 30.0


@register("recall_ann", Params, recall=True, policy=Policy(inline="allowed"), reads=("ctx:user_e",))
class RecallAnn:
    def __init__(self, p: Params, env: StageEnv):
        self.k, self.bit, self.index = p.k, env.route_bit, env.models.index

    def __call__(self, ctx) -> Candidates:
        scores, ids = self.index.search(ctx.user_e, self.k)
        ok = ids[0] >= 0
        return Candidates.from_route(ids[0][ok], scores[0][ok], self.bit)
