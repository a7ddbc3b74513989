"""Ground truth for the tuning run: what a weight vector is truly worth, and the best one a grid finds.

The value of an item to a user is the expectation of the tuner's own reward under the world's
truth: sum over actions of reward weight x the true unconditional probability (a `sum` fusion
of the true task probabilities; model_export.world). A list's true utility is that value
discounted by position, normalised between a uniform list (0) and the oracle's top list (1), as
`recserve eval` and the simulator score lists. A weight vector is scored by serving a fixed
sample of online users in process (the bundle's state, clock stopped) with those weights as
control's (Engine.set_arms: the same path a live server takes) and scoring the lists.
"""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from engine.core.arms import Arms, config_with_arms
from engine.core.bundle import Bundle
from engine.core.config import Config, apply_overrides, parse_config
from engine.core.request import Request
from engine.core.runner import Engine
from engine.store.embedded import EmbeddedStore
from loadtest.simulate.world import SimWorld, scores, unseen
from model_export.cascade import StoppedClock
from model_export.evaluate import DEADLINE_MS
from stages.rerank_beam import Params as RerankParams


def truth_params(reward: dict[str, float]) -> RerankParams:
    """The world's value function for a reward: its expectation per impression, before discount."""
    return RerankParams(fusion="sum", weights=dict(reward))


class TruthJudge:
    """Serves a fixed user sample with any control weights and scores the lists against the truth."""

    def __init__(self, cfg: Config, bundle: Bundle, world: SimWorld, stage: str, users: int, seed: int = 0):
        # route timeouts lifted, as `recserve eval` does: a route abandoned on a busy machine
        # would make lists differ for reasons that are not the weights
        raw = apply_overrides(cfg.raw, {f"stage.{n}.timeout_ms": DEADLINE_MS for n in cfg.pipeline.recall}, "judge")
        self.cfg, self.world, self.key = parse_config(raw, cfg.path), world, f"stage.{stage}.weights"
        store = EmbeddedStore(bundle)
        store.clock = StoppedClock(float(bundle.state.time))
        self.engine = Engine(config_with_arms(self.cfg, Arms()), bundle, store=store)
        rng = np.random.default_rng([seed, 7])
        self.users = world.active[rng.permutation(world.active.size)[:users]]
        self.contexts = [world.context(int(u), rng) for u in self.users]
        self.index = {str(i): k for k, i in enumerate(bundle.item_ids)}
        self.eligible = [unseen(np.asarray(bundle.state.user_seen[u]), world.ds.n_items) for u in self.users]

    def utility(self, weights: dict[str, float]) -> float:
        """Oracle-normalised true utility of the sample's lists under these control weights."""
        self.engine.set_arms(config_with_arms(self.cfg, Arms(0, (), {self.key: dict(weights)})))
        got = []
        for u, ctx, elig in zip(self.users, self.contexts, self.eligible):
            r = self.engine.recommend(Request(str(self.world.ds.user_ids[u]), 20, ctx, deadline_ms=DEADLINE_MS))
            items = np.fromiter((self.index[i] for i in r.item_ids), np.int64, len(r.item_ids))
            got.append(scores(self.world.value(int(u)), items, elig)[:3])
        util, oracle, uniform = (np.mean([g[k] for g in got]) for k in range(3))
        return float((util - uniform) / (oracle - uniform))

    def grid(self, fixed: dict[str, float], axes: dict[str, list[float]]) -> dict[str, Any]:
        """Every combination of the axes' values (with the fixed weights), scored; the best first."""
        rows = []
        names = list(axes)
        for combo in itertools.product(*(axes[n] for n in names)):
            w = {**fixed, **dict(zip(names, combo))}
            rows.append({"weights": w, "utility": self.utility(w)})
        rows.sort(key=lambda r: -r["utility"])
        return {"axes": axes, "fixed": fixed, "users": int(self.users.size), "best": rows[0], "rows": rows}

    def close(self) -> None:
        self.engine.close()
