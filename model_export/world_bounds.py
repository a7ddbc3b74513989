"""What a synthetic world allows: reference lists that know the ground truth, for targets a model
may not be able to reach.

    python -m model_export.world_bounds --config configs/large.toml retrieval
    python -m model_export.world_bounds --config configs/cold.toml cold
    python -m model_export.world_bounds --config configs/default.toml utility

retrieval: recall@k of the validation window's positives (the users and metric of the build's
two-tower validation, `train.two_tower_recall`) for the most-popular list, for popularity x the
true click probability, and for the logging policy's own exposure x the true click probability:
the ranking by how likely the log is to hold a positive of that item for that user, which no
model of the log can beat by much.

cold: the share of cold items (no impressions at the end of the log) in the oracle's top 20 of
the eligible catalog against an *informed* oracle that knows every user's and item's true latent
but, for a cold item, only its author's quality (its own quality noise averaged out): what the
best possible content-and-author model of a cold item would give it.

utility: which part of the truth the served lists lose by, on the eligible catalog: the
oracle's list against lists ranked by the truth with one part estimated from the log alone,
each estimate given its best linear calibration against the truth, so a row is what that
estimate is worth at most. Taste from the content of the user's recent positives (the cosine
of their centroid with the item's content, the rankers' coarse feature 9); quality from the
item's counters (smoothed click rate and impressions, as the rankers see them).
"""
from __future__ import annotations

import argparse

import numpy as np

from engine.core.config import load_config
from engine.core.featurize import CTR_PRIOR_IMP, CTR_PRIOR_POS, pooled
from engine.core.state import FeatureState, snapshot
from model_export.dataset import Dataset
from model_export.progress import bar
from model_export.world import (EXPLORE_SHARE, ITEM_QUALITY_NOISE, POPULAR_SHARE, SESSION_LEN, TASKS,
                                TASTE_CANDIDATES, TasteCandidates, WorldTruth, _unconditional, make_world,
                                world_parts)
from stages.rerank_beam import Params as RerankParams
from stages.rerank_beam import fuse

COUNT = 20
DISCOUNT = 1.0 / np.log2(np.arange(COUNT) + 2.0)


def retrieval(cfg_path: str, k: int = 100, n_users: int = 300, sessions: int = 3000, seed: int = 0) -> dict:
    cfg = load_config(cfg_path)
    users, items, truth, _ = world_parts(cfg.data)
    ds = make_world(cfg.data)
    v = ds.window(ds.t_valid, ds.t_end)
    v = v[ds.log_labels[v, 0] > 0]
    before = np.bincount(ds.log_item[ds.window(0, ds.t_valid)][ds.log_labels[ds.window(0, ds.t_valid), 0] > 0],
                         minlength=ds.n_items).astype(np.float64)
    all_users = np.unique(ds.log_user[v])
    # the build's two-tower validation sample (seed 0, up to 1000 users), first n_users of it
    picked = np.sort(np.random.default_rng(0).permutation(all_users.size)[:1000])[:n_users]
    sampler, rng = TasteCandidates(cfg.data, users, items, truth), np.random.default_rng(seed)
    servable = ~items["cold"]
    pop = items["popularity"] * servable
    taste_slots = (1 - EXPLORE_SHARE - POPULAR_SHARE) * (sum(SESSION_LEN) / 2 - 0.5)
    per_taste = max(1, round(taste_slots))
    got: dict[str, list[float]] = {"popular": [], "popular x true click": [], "policy exposure x true click": []}
    for u in bar(all_users[picked], desc="retrieval bound", unit="user"):
        mine = np.unique(ds.log_item[v][ds.log_user[v] == u])
        p_click = truth.user_probs(int(u))[:, 0]
        cand, score = sampler.draw(rng, np.full(sessions * TASTE_CANDIDATES, u),
                                   np.full(sessions * TASTE_CANDIDATES, ds.t_end))
        cand, score = cand.reshape(sessions, -1), score.reshape(sessions, -1)
        shown = np.take_along_axis(cand, np.argsort(-score, 1)[:, :per_taste], 1).ravel()
        exposure = (EXPLORE_SHARE * servable / servable.sum() + POPULAR_SHARE * pop / pop.sum()
                    + (1 - EXPLORE_SHARE - POPULAR_SHARE) * np.bincount(shown, minlength=ds.n_items) / shown.size)
        for name, s in zip(got, (before, pop * p_click, exposure * p_click)):
            top = np.argpartition(-s, k)[:k]
            got[name].append(float(np.isin(mine, top).mean()))
    out = {f"{name} recall@{k}": float(np.mean(r)) for name, r in got.items()}
    return {"users": int(picked.size), **out}


def cold(cfg_path: str, n_users: int = 100, draws: int = 16, seed: int = 0) -> dict:
    ds, st, rerank = _world_at_end(cfg_path)
    truth: WorldTruth = ds.truth
    is_cold = st.item_n_imp == 0
    rng = np.random.default_rng(seed)
    users = _users(ds, n_users, rng)
    got: dict[str, list[tuple[float, float]]] = {"oracle": [], "informed oracle": []}
    for u in bar(users, desc="cold bound", unit="user"):
        value, taste, eligible = _user_value(truth, st, rerank, int(u))
        true = value(taste, truth.item_quality)
        expected = np.mean([value(taste, truth.author_quality + ITEM_QUALITY_NOISE * rng.standard_normal(ds.n_items))
                            for _ in range(draws)], axis=0)
        for name, s in (("oracle", true), ("informed oracle", np.where(is_cold, expected, true))):
            s = np.where(eligible, s, -np.inf)
            top = np.argsort(-s)[:COUNT]
            got[name].append((float(is_cold[top].mean()), float(true[top] @ DISCOUNT)))
    return {"users": int(users.size), "eligible cold share": float(is_cold.mean()),
            **{f"{name} {m}": float(np.mean([r[j] for r in rows]))
               for name, rows in got.items() for j, m in enumerate(("cold share", "utility"))}}


def utility(cfg_path: str, n_users: int = 100, seed: int = 0) -> dict:
    ds, st, rerank = _world_at_end(cfg_path)
    truth: WorldTruth = ds.truth
    n_imp, n_pos = st.item_n_imp.astype(np.float64), st.item_n_pos.astype(np.float64)
    log_ctr = np.log((n_pos + CTR_PRIOR_POS) / (n_imp + CTR_PRIOR_IMP))
    x = np.stack([np.ones(ds.n_items), log_ctr, np.log1p(n_imp), log_ctr * np.log1p(n_imp)], axis=1)
    has = n_imp > 0
    beta = np.linalg.lstsq(x[has], truth.item_quality[has], rcond=None)[0]
    q_hat = np.where(has, x @ beta, truth.item_quality[has].mean()).astype(np.float32)
    q_r2 = 1 - np.var(truth.item_quality[has] - q_hat[has]) / np.var(truth.item_quality[has])
    content = ds.item_content / np.maximum(np.linalg.norm(ds.item_content, axis=1, keepdims=True), 1e-6)
    users = _users(ds, n_users, np.random.default_rng(seed))
    names = ("oracle", "quality from counters", "taste from history content", "both from the log")
    got: dict[str, list[float]] = {k: [] for k in names}
    corr, uniform = [], []
    for u in bar(users, desc="utility bound", unit="user"):
        value, taste, eligible = _user_value(truth, st, rerank, int(u))
        centroid = pooled(content, st.user_recent[u:u + 1])[0]
        similarity = content @ (centroid / max(float(np.linalg.norm(centroid)), 1e-6))
        if np.ptp(similarity[eligible]) > 0:
            corr.append(float(np.corrcoef(similarity[eligible], taste[eligible])[0, 1]))
            taste_hat = np.polyval(np.polyfit(similarity[eligible], taste[eligible], 1), similarity).astype(np.float32)
        else:       # no positive yet: nothing about taste is known
            taste_hat = np.full(ds.n_items, taste[eligible].mean(), np.float32)
        true = value(taste, truth.item_quality)
        uniform.append(float(true[eligible].mean() * DISCOUNT.sum()))
        for name, s in zip(names, (true, value(taste, q_hat), value(taste_hat, truth.item_quality),
                                   value(taste_hat, q_hat))):
            top = np.argsort(-np.where(eligible, s, -np.inf))[:COUNT]
            got[name].append(float(true[top] @ DISCOUNT))
    span = np.mean(got["oracle"]) - np.mean(uniform)
    return {"users": int(users.size), "quality R2 from counters": float(q_r2),
            "corr(history content similarity, taste), users with a positive": float(np.mean(corr)),
            **{f"{name} utility_norm": float((np.mean(r) - np.mean(uniform)) / span) for name, r in got.items()}}


def _world_at_end(cfg_path: str) -> tuple[Dataset, FeatureState, RerankParams]:
    """The world, its feature state at the log's end and the rerank's fusion params."""
    cfg = load_config(cfg_path)
    ds = make_world(cfg.data)
    st = snapshot(ds.log_user, ds.log_item, ds.log_time, ds.log_labels[:, 0], ds.n_users, ds.n_items, ds.t_end,
                  cfg.train.recent_len, cfg.serving.seen_window, 1.0)
    rerank = next(cfg.stage[n][1] for n in cfg.pipeline.stages if cfg.stage[n][0] == "rerank_beam")
    return ds, st, rerank


def _users(ds: Dataset, n_users: int, rng: np.random.Generator) -> np.ndarray:
    """Up to n_users users with held-out activity."""
    active = np.unique(ds.log_user[ds.window(ds.t_valid, ds.t_end)])
    return rng.choice(active, min(n_users, active.size), replace=False)


def _user_value(truth: WorldTruth, st: FeatureState, rerank: RerankParams, u: int):
    """User u's fused true value as a function of (taste, quality) per item, their true taste,
    and the items not yet seen (eligible)."""
    ul = truth.user_latent[u]
    taste, finish, log_aff = truth.item_latent @ ul, truth.item_finish @ ul, truth.user_log_aff[u, truth.item_category]
    seen = st.user_seen[u]
    eligible = np.ones(taste.size, bool)
    eligible[seen[seen >= 0]] = False

    def value(t: np.ndarray, quality: np.ndarray) -> np.ndarray:
        p = _unconditional(truth._conditional(t, finish, quality, log_aff))
        return fuse({k: p[:, j] for j, k in enumerate(TASKS)}, rerank.weights, rerank.fusion, rerank.eps)

    return value, taste, eligible


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--users", type=int, default=None)
    p.add_argument("what", choices=("retrieval", "cold", "utility"))
    a = p.parse_args()
    fn = {"retrieval": retrieval, "cold": cold, "utility": utility}[a.what]
    out = fn(a.config, **({"n_users": a.users} if a.users else {}))
    for key, val in out.items():
        print(f"{key}: {val:.4f}" if isinstance(val, float) else f"{key}: {val}")


if __name__ == "__main__":
    main()
