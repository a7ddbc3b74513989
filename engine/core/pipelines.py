"""What one bundle version serves: the config's pipelines as steps the engine runs, the
experiment arms that assign them, and the stage instances they share. Built whole and
swapped whole by engine.core.runner.Engine (a new bundle, or new arms), so a request never
mixes two versions.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from engine.core import registry
from engine.core.bundle import Bundle
from engine.core.config import Config
from engine.core.errors import ConfigError
from engine.core.ids import IdIndex
from engine.core.models import Models
from engine.core.registry import KindSpec, StageEnv


@dataclass(frozen=True)
class Step:
    """One stage instance as the engine runs it; every field but `fn` comes from the config
    and the kind's registration."""

    name: str
    spec: KindSpec
    fn: Callable           # recall: (ctx) -> Candidates; stages: (ctx, Candidates) -> Candidates
    route_bit: int = 0     # recall: this route's bit in Candidates.routes
    timeout_ms: float = 0.0    # recall: waited for no longer
    inline: bool = False   # recall: run on the request thread instead of the pool
    budget_ms: float | None = None   # skippable stages: skipped when less time is left


@dataclass(frozen=True)
class Pipeline:
    recall: list[Step]
    stages: list[Step]


CAP_BURST = 4.0   # lists a capped arm may run ahead of its share in any window of a worker's lists


@dataclass
class Assignment:
    """The config whose experiments assign users, with its pipelines: swapped as one reference
    (Engine.set_arms), so a request never sees an arm's name without its pipeline.

    A capped experiment (`cap`; every arm `recserve tune` installs) is a hard traffic bound, not a
    hash share: users drawn by activity put more or fewer lists than `share` in an arm, so
    each capped arm has a token bucket that every list of this worker fills by `share` (up to
    CAP_BURST) and each of the arm's lists empties by one; a user hashed to an arm whose bucket
    is empty gets control. In any window of W lists an arm serves at most share * W + CAP_BURST
    of them, per worker and so in total."""
    config: Config
    pipelines: dict[str, Pipeline]
    _tokens: dict[str, float] = field(init=False, repr=False)     # capped arm -> its bucket
    _shares: dict[str, float] = field(init=False, repr=False)     # capped arm -> its share
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self._shares = {n: e.share for n, e in self.config.experiments.items() if e.cap}
        self._tokens = dict.fromkeys(self._shares, 1.0)

    def assign(self, user_id: str) -> str:
        """The arm serving this user's list now ("" = control); counts the list against caps."""
        exp = self.config.experiment_for(user_id)
        if not self._tokens:
            return exp
        with self._lock:
            for name, share in self._shares.items():
                self._tokens[name] = min(CAP_BURST, self._tokens[name] + share)
            if exp in self._tokens:
                if self._tokens[exp] < 1.0:
                    return ""
                self._tokens[exp] -= 1.0
        return exp


class Live:
    """Everything tied to one bundle version; replaced whole on swap."""

    def __init__(self, config: Config, bundle: Bundle, store, remote_models: dict | None = None):
        self.bundle, self.store = bundle, store
        self.models = Models(bundle, config.serving, remote_models)
        self.user_index, self.item_index = IdIndex(bundle.user_ids), IdIndex(bundle.item_ids)
        self.item_ids = np.asarray(bundle.item_ids)
        n_pos = np.asarray(bundle.state.item_n_pos)
        self.fallback = np.argsort(-n_pos, kind="stable")[:1000].astype(np.int32)
        self.route_names = list(config.pipeline.recall)
        self._stages: dict[tuple, object] = {}
        self.arms = self.build_arms(config)

    @property
    def pipelines(self) -> dict[str, Pipeline]:
        return self.arms.pipelines

    def build_arms(self, config: Config) -> Assignment:
        pipelines = {"": self._build(config)}
        for name in config.experiments:
            try:
                pipelines[name] = self._build(config.variant(name))
            except ConfigError as e:
                raise ConfigError(f"experiments.{name}: {e}") from None
        return Assignment(config, pipelines)

    def prune(self) -> None:
        """Close and forget the stage instances no pipeline of the serving arms uses (a
        replaced arm's reranker); requests still running on them finish."""
        used = {id(st.fn) for p in self.arms.pipelines.values() for st in (*p.recall, *p.stages)}
        for key, fn in list(self._stages.items()):
            if id(fn) not in used:
                del self._stages[key]
                if hasattr(fn, "close"):
                    fn.close()

    def close(self) -> None:
        """Stop the stages' background work (refresh threads); in-flight requests still finish."""
        for fn in self._stages.values():
            if hasattr(fn, "close"):
                fn.close()

    def _build(self, cfg: Config) -> Pipeline:
        def stage(name: str, bit: int):
            kind, params = cfg.stage[name]
            spec = registry.kind(kind)
            key = (name, kind, bit, repr(params))
            fn = self._stages.get(key)
            if fn is None:  # experiments that leave a stage alone share it (and its refresh thread)
                env = StageEnv(name, self.bundle, self.models, self.store, cfg, bit, self.item_index)
                fn = self._stages[key] = spec.factory(params, env)
            return spec, params, fn

        def route(i: int, name: str) -> Step:
            spec, p, fn = stage(name, 1 << i)       # p: RouteParams, its inline settled at load
            return Step(name, spec, fn, route_bit=1 << i, timeout_ms=p.timeout_ms, inline=p.inline)

        def step(name: str) -> Step:
            spec, p, fn = stage(name, 0)            # skippable kinds' Params are BudgetParams
            return Step(name, spec, fn, budget_ms=p.budget_ms if spec.policy.skippable else None)

        return Pipeline([route(i, n) for i, n in enumerate(cfg.pipeline.recall)],
                        [step(n) for n in cfg.pipeline.stages])
