"""Rerank: fuse task predictions into one score, then beam-search the served list.

The list objective is sum_pos fused * 1/log2(pos + 2) minus penalties for an item sharing
its category or author with the item before it, plus a reward each time a category first
appears. Each step scores every (beam, candidate) extension as one [B, M] array, so the
search is `count` numpy steps, never a loop over candidates. With width 1 and no
penalties or reward it is exactly a sort by fused score.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.core.candidates import Candidates, Guarantee, found_in
from engine.core.errors import ConfigError
from engine.core.registry import TASK_SCORES, StageEnv, register


@dataclass
class Params:
    fusion: str = "product"                 # product: prod (p_t + eps)^w_t | sum: sum w_t p_t
    weights: dict[str, float] = field(default_factory=dict)   # task -> weight; missing tasks weigh 0
    eps: float = 1e-3
    beam_width: int = 4
    pool: int = 100                         # best-fused candidates the search considers
    category_penalty: float = 0.0
    author_penalty: float = 0.0
    coverage_reward: float = 0.0

    def check(self) -> None:
        if self.fusion not in ("product", "sum"):
            raise ConfigError(f"fusion: '{self.fusion}' is not one of product, sum")
        if self.beam_width <= 0 or self.pool <= 0:
            raise ConfigError("beam_width, pool: must be > 0")
        if self.eps <= 0:
            raise ConfigError("eps: must be > 0")
        if not self.weights:
            raise ConfigError("weights: give at least one task weight")


def fuse(task_scores: dict[str, np.ndarray], weights: dict[str, float], fusion: str, eps: float) -> np.ndarray:
    if fusion == "product":
        log = sum(w * np.log(task_scores[t] + eps) for t, w in weights.items() if t in task_scores)
        return np.exp(log).astype(np.float32)
    return sum(w * task_scores[t] for t, w in weights.items() if t in task_scores).astype(np.float32)


def beam_search(fused: np.ndarray, category: np.ndarray, author: np.ndarray, count: int, width: int,
                category_penalty: float = 0.0, author_penalty: float = 0.0,
                coverage_reward: float = 0.0) -> tuple[np.ndarray, float]:
    """Indices (into the inputs) of the best list of length <= count found, and its reward.

    The pairwise adjacency penalty is one [M, M] matrix built up front, so each step is a
    row gather plus a masked top-`width` over the [B, M] extensions.
    """
    m = fused.size
    count = min(count, m)
    if count == 0:
        return np.empty(0, np.int64), 0.0
    gains = np.outer(1.0 / np.log2(np.arange(count) + 2.0), fused.astype(np.float64))  # [count, M]
    penalty = None
    if category_penalty or author_penalty:
        penalty = (category_penalty * (category[:, None] == category[None, :])
                   + author_penalty * (author[:, None] == author[None, :]))
    same_cat = category[:, None] == category[None, :] if coverage_reward else None
    chosen = np.zeros((1, count), np.int64)
    total = np.zeros(1)
    blocked = np.zeros((1, m))            # -inf where an item is already in the beam's list
    new_cat = np.ones((1, m), bool)       # the item's category is not yet in the beam's list
    for step in range(count):
        cand = total[:, None] + gains[step] + blocked
        if penalty is not None and step:
            cand -= penalty[chosen[:, step - 1]]
        if same_cat is not None:
            cand += coverage_reward * new_cat
        flat = cand.ravel()
        k = min(width, m - step)
        top = np.argpartition(-flat, k - 1)[:k] if k < flat.size else np.arange(flat.size)
        top = top[np.argsort(-flat[top], kind="stable")]
        beam, item = np.divmod(top, m)
        chosen, total, blocked = chosen[beam], flat[top], blocked[beam]
        chosen[:, step] = item
        blocked[np.arange(k), item] = -np.inf
        if same_cat is not None:
            new_cat = new_cat[beam] & ~same_cat[item]
    return chosen[0], float(total[0])


# task scores when the fine ranker ran; when it was skipped, the latest (coarse) score is fused
@register("rerank_beam", Params, reads=("ctx:request",), reads_if_present=(TASK_SCORES,), writes=("score:fused",))
class RerankBeam:
    def __init__(self, p: Params, env: StageEnv):
        self.p = p
        unknown = set(p.weights) - set(env.bundle.tasks)
        if unknown:
            raise ConfigError(f"stage.{env.name}.weights: tasks {sorted(unknown)} are not in the bundle "
                              f"(it has {list(env.bundle.tasks)})")
        self.category = np.asarray(env.bundle.tables.item_category)
        self.author = np.asarray(env.bundle.tables.item_author)

    def __call__(self, ctx, c: Candidates) -> Candidates:
        p, count = self.p, ctx.request.count
        tasks = c.task_scores()
        fused = fuse(tasks, p.weights, p.fusion, p.eps) if tasks else c.scores[c.primary]
        c = c.with_columns({"fused": fused}, primary="fused")
        pool = c.keep_top(fused, max(p.pool, count), Guarantee.FINAL)
        order, _ = beam_search(pool.scores["fused"], self.category[pool.item], self.author[pool.item],
                               count, p.beam_width, p.category_penalty, p.author_penalty, p.coverage_reward)
        pinned = np.flatnonzero(pool.guaranteed >= Guarantee.FINAL)
        missing = pinned[~found_in(pinned, order)]
        if missing.size:  # pinned items take the last slots they are not already in
            listed = found_in(order, pinned)
            keep = order[~listed][: max(count - pinned.size, 0)]
            order = np.concatenate([keep, np.sort(order[listed]), missing])[:max(count, pinned.size)]
        return pool.take(order)
