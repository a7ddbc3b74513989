"""ANN recall: the two-tower user embedding searched against the faiss index of item embeddings."""
from __future__ import annotations

from dataclasses import dataclass

from engine.candidates import Candidates
from engine.config import ConfigError
from engine.registry import StageEnv, register


@dataclass
class Params:
    k: int = 2000
    timeout_ms: float = 30.0

    def check(self) -> None:
        if self.k <= 0:
            raise ConfigError("k: must be > 0")
        if self.timeout_ms <= 0:
            raise ConfigError("timeout_ms: must be > 0")


@register("recall_ann", Params, recall=True)
class RecallAnn:
    def __init__(self, p: Params, env: StageEnv):
        self.k, self.bit, self.index = p.k, env.route_bit, env.models.index

    def __call__(self, ctx) -> Candidates:
        scores, ids = self.index.search(ctx.user_e, self.k)
        ok = ids[0] >= 0
        return Candidates.from_route(ids[0][ok], scores[0][ok], self.bit)
