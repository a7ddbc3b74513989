"""Offline recall: what the served recall routes and filters return for many users at their cuts.

Training rows for data without impressions (model_export.implicit) and distillation of the
fine ranker into earlier stages both need the candidates a user would have been served at a
point in the past. This runs the config's own recall stages and filter stages (the registry's
factories, the same code the server runs) per user, over a feature state walked forward
through the log: each user is served from the training rows before their cut (`Phase`), on a
clock stopped at the cut, exactly as `recserve eval` serves held-out users.

`walk` yields groups of users sharing a cut with a store holding the state there;
`Recall` runs the stages for one group; `recall` does both for a phase and returns flat arrays.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from engine.core import registry
from engine.core.candidates import Candidates, merge
from engine.core.config import Config
from engine.core.context import RequestContext, UserFeatures
from engine.core.featurize import Tables, user_tower_input
from engine.core.ids import IdIndex
from engine.core.refresh import RefreshedRoute
from engine.core.registry import StageEnv
from engine.core.request import Request
from engine.core.state import FeatureState, decay, snapshot
from engine.store.common import state_user, top_hot
from indexes import AnnIndex, build_index
from model_export.dataset import Dataset, Phase

EmbedFn = Callable[[np.ndarray], np.ndarray]   # dense user-tower input [B, D] -> embeddings [B, d]


class StoppedClock:
    """A feature store clock held at a given day: cold-start windows and item ages then measure
    from the state's time, not from when the tool runs."""

    def __init__(self, t: float):
        self.t = t

    def days(self, unix: float | None = None) -> float:
        return self.t


class OfflineStore:
    """The feature store reads the recall and filter stages use (engine.core.features.FeatureStore),
    over a state held in arrays that `walk` moves forward. Item hot scores are kept as of the
    clock's now; users are read from the user-side state of `walk`."""

    name = "offline"

    def __init__(self, users: FeatureState, n_items: int):
        self.users = users.arrays()
        self.item_n_imp = np.zeros(n_items, np.float32)
        self.item_n_pos = np.zeros(n_items, np.float32)
        self.item_hot = np.zeros(n_items, np.float64)
        self.clock = StoppedClock(0.0)

    def user(self, user_id: str, index: int, default_profile: np.ndarray, profiles: np.ndarray) -> UserFeatures:
        return state_user(self.users, index, profiles[index])

    def item_stats(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.item_n_imp[items], self.item_n_pos[items], self.item_hot[items].astype(np.float32)

    def hot_top(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return top_hot(self.item_hot, n)

    def fell_back(self) -> bool:
        return False


@dataclass
class Group:
    users: np.ndarray       # int64 users whose cut is this group's
    now: float              # days: the clock at the cut
    store: OfflineStore     # the state at the cut (shared, moved forward by the next group)


def user_state(ds: Dataset, phase: Phase, recent_len: int, seen_len: int, half_life: float) -> FeatureState:
    """Each user's side of the state at their own cut (recent, seen, counts over the user's
    training rows before it). The item side of the result mixes cuts: read items from `walk`."""
    r = np.flatnonzero(ds.train_mask & (np.arange(len(ds.log_user)) < phase.cut[ds.log_user]))
    return snapshot(ds.log_user[r], ds.log_item[r], ds.log_time[r], ds.log_labels[r, 0], ds.n_users, ds.n_items,
                    np.inf, recent_len, seen_len, half_life)


def walk(ds: Dataset, phase: Phase, users: np.ndarray, recent_len: int, seen_len: int,
         half_life: float) -> Iterator[Group]:
    """Groups of `users` by cut, in log order, each with the store's state at that cut: the
    training rows before it, folded in as `snapshot` folds them (counts, hot decayed to now)."""
    users = np.asarray(users, np.int64)
    users = users[phase.cut[users] < len(ds.log_user)]
    users = users[np.lexsort((users, phase.cut[users]))]
    store = OfflineStore(user_state(ds, phase, recent_len, seen_len, half_life), ds.n_items)
    train, pos = ds.train_mask, ds.log_labels[:, 0] > 0
    at, t_cur = 0, 0.0
    cuts, starts = np.unique(phase.cut[users], return_index=True)
    for c, lo, hi in zip(cuts, starts, np.r_[starts[1:], users.size]):
        now = float(phase.now[users[lo]])
        new = np.flatnonzero(train[at:c]) + at
        hot_rows = new[pos[new]]
        store.item_hot *= decay(t_cur, now, half_life)
        np.add.at(store.item_hot, ds.log_item[hot_rows], decay(ds.log_time[hot_rows], now, half_life))
        store.item_n_imp += np.bincount(ds.log_item[new], minlength=ds.n_items).astype(np.float32)
        store.item_n_pos += np.bincount(ds.log_item[hot_rows], minlength=ds.n_items).astype(np.float32)
        store.clock.t = now
        at, t_cur = int(c), now
        yield Group(users[lo:hi], now, store)


@dataclass
class UserStates:
    """The request side of each recalled user at their cut, aligned with `users`."""

    users: np.ndarray       # int64 [B]
    now: np.ndarray         # float64 [B] days
    context: np.ndarray     # int32 [B, K] the context of the user's first row in the phase
    recent: np.ndarray      # int32 [B, L]
    n_imp: np.ndarray       # float32 [B]
    n_pos: np.ndarray       # float32 [B]
    user_e: np.ndarray      # float32 [B, d] two-tower user embeddings


@dataclass
class Recalled:
    """Candidates of many users as flat arrays, grouped by user in `UserStates.users` order."""

    row: np.ndarray         # int64 [M] index into UserStates.users
    item: np.ndarray        # int32 [M]
    routes: np.ndarray      # uint8 [M] bit r set: route `names[r]` found the item
    score: np.ndarray       # float32 [M] the best recall score (engine.core.candidates.merge)
    item_stats: np.ndarray  # float32 [M, 3] impressions, positives, hot of the item at the user's cut
    names: tuple[str, ...]  # the config's recall routes in bit order


class Recall:
    """The config's recall routes and filter stages, built by the registry over an OfflineStore.

    Background refreshes are stopped: `refresh()` rebuilds the refreshed routes (hot, cold
    start) after the store moved, so every user of a group sees the state at their cut."""

    def __init__(self, cfg: Config, tables: Tables, schema: dict, item_ids: np.ndarray, store: OfflineStore,
                 index: AnnIndex | None = None):
        bundle = SimpleNamespace(tables=tables, manifest={"schema": schema}, version="offline")
        models = SimpleNamespace(index=index if index is not None else build_index(tables.item_emb, "flat"))
        item_index = IdIndex(item_ids)
        self.tables, self.store = tables, store
        self.names = tuple(cfg.pipeline.recall)

        def make(name: str, bit: int):
            kind, params = cfg.stage[name]
            return registry.kind(kind).factory(params, StageEnv(name, bundle, models, store, cfg, bit, item_index))

        self.routes = [make(n, 1 << b) for b, n in enumerate(self.names)]
        self.filters = [make(n, 0) for n in cfg.pipeline.stages if cfg.stage[n][0] == "filter"]
        for fn in self.routes:
            if isinstance(fn, RefreshedRoute):
                fn.close()

    def refresh(self) -> None:
        for fn in self.routes:
            if isinstance(fn, RefreshedRoute):
                fn.refresh()

    def __call__(self, ctx: RequestContext) -> Candidates:
        c = merge([fn(ctx) for fn in self.routes])
        for f in self.filters:
            c = f(ctx, c)
        return c

    def close(self) -> None:
        for fn in self.routes:
            if hasattr(fn, "close"):
                fn.close()


def contexts(ds: Dataset, phase: Phase, users: np.ndarray) -> np.ndarray:
    """int32 [B, K]: the context of each user's first row of the phase (what their request carries)."""
    rows = phase.rows
    first = np.full(ds.n_users, -1, np.int64)
    u = ds.log_user[rows]
    uniq, at = np.unique(u, return_index=True)
    first[uniq] = rows[at]
    return np.where((first[users] >= 0)[:, None], ds.log_context[np.maximum(first[users], 0)], 0).astype(np.int32)


def request_contexts(ds: Dataset, tables: Tables, store: OfflineStore, states: UserStates,
                     rows: np.ndarray, now: float) -> Iterator[tuple[int, RequestContext]]:
    """(row into `states`, the RequestContext a request of that user would get) for `rows`."""
    for k in rows:
        u = int(states.users[k])
        user = store.user(str(ds.user_ids[u]), u, tables.default_profile, tables.user_profile)
        req = Request(str(ds.user_ids[u]), 20)
        yield k, RequestContext(req, user, states.context[k:k + 1], states.user_e[k:k + 1],
                                np.empty(0, np.int32), now, np.inf, "", tables)


def recall(ds: Dataset, cfg: Config, tables: Tables, schema: dict, user_emb: EmbedFn, phase: Phase,
           users: np.ndarray | None = None, index: AnnIndex | None = None,
           on_group: Callable[[Group, UserStates, np.ndarray], None] | None = None) -> tuple[Recalled, UserStates]:
    """Recall for `users` (default: every user with rows in `phase`) at their cuts in `phase`.

    Runs the routes of `cfg.pipeline.recall` and the filter stages of `cfg.pipeline.stages`
    (seen, excluded, blocked, author cap) with the features of `tables` (its i2i table: the one
    built without the phase's rows) and the user tower `user_emb`; `index` (default: exact
    search over tables.item_emb) serves the ann route. Returns every user's filtered candidates
    with their route bits, best recall score and item state at the cut, and the users' request
    side. `on_group(group, states, rows)` is called with each group's store at its cut (rows:
    the group's users in `states`), e.g. to sample other items with the same state.
    """
    users = np.sort(phase.users if users is None else np.asarray(users, np.int64))
    users = users[phase.cut[users] < len(ds.log_user)]
    half_life = cfg.serving.hot_half_life_hours / 24
    L, S = schema["recent_len"], schema["seen_len"]
    ust = user_state(ds, phase, L, S, half_life)
    ctx = contexts(ds, phase, users)
    recent = ust.user_recent[users]
    states = UserStates(users, phase.now[users], ctx, recent, ust.user_n_imp[users], ust.user_n_pos[users],
                        user_emb(user_tower_input(tables, users, ds.user_profile[users], ctx, recent)))
    where = {int(u): k for k, u in enumerate(users)}
    parts: list[tuple[int, Candidates, np.ndarray]] = []
    rec = None
    for g in walk(ds, phase, users, L, S, half_life):
        if rec is None:
            rec = Recall(cfg, tables, schema, ds.item_ids, g.store, index)
        rec.refresh()
        rows = np.array([where[int(u)] for u in g.users], np.int64)
        for k, c in request_contexts(ds, tables, g.store, states, rows, g.now):
            c = rec(c)
            parts.append((k, c, np.stack(g.store.item_stats(c.item), axis=1)))
        if on_group is not None:
            on_group(g, states, rows)
    if rec is not None:
        rec.close()
    names = tuple(cfg.pipeline.recall)
    if not parts:
        e = np.empty(0)
        return Recalled(e.astype(np.int64), e.astype(np.int32), e.astype(np.uint8), e.astype(np.float32),
                        np.empty((0, 3), np.float32), names), states
    parts.sort(key=lambda p: p[0])
    return Recalled(np.concatenate([np.full(len(c), k, np.int64) for k, c, _ in parts]),
                    np.concatenate([c.item for _, c, _ in parts]),
                    np.concatenate([c.routes for _, c, _ in parts]),
                    np.concatenate([c.scores["recall"] for _, c, _ in parts]),
                    np.concatenate([s for _, _, s in parts]).astype(np.float32), names), states
