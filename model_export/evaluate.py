"""`recserve eval`: how good the served lists are, end to end, on held-out users, against baselines.

Model AUCs say little about what a user is shown; this asks the engine itself for each
sampled user's list and scores it: against exact search (ANN recall), against the fine
ranker run over the whole eligible catalog (did the funnel cut the items the ranker likes
best?), against the synthetic world's ground truth (normalised utility: random 0, oracle 1),
or, on data without a truth, against each user's held-out positives. In the same run and on
the same users and eligible items: popularity, ItemKNN and EASE (model_export.baselines).

Held-out protocol (no truth): each user is served from the feature store as of their cut
(model_export.dataset: global split, t_valid; per-user split, the user's first held-out row),
reached by replaying the training rows before it into the store as events, the way a server
hears them. docs/quality.md reads the report (eval.json, eval.md, eval.png).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from engine.core import featurize
from engine.core.bundle import Bundle, load_bundle
from engine.core.candidates import Candidates
from engine.core.config import Config, apply_overrides, load_config, parse_config
from engine.core.sections import DataConfig
from engine.core.context import RequestContext
from engine.core.features import ResolvedEvent
from engine.core.refresh import RefreshedRoute
from engine.core.request import Request, Response
from engine.core.runner import Engine
from engine.core.state import snapshot
from engine.store.embedded import EmbeddedStore
from indexes import measure_recall
from model_export.baselines import Baselines
from model_export.cascade import StoppedClock, contexts
from model_export.data import load_dataset
from model_export.dataset import Dataset
from model_export.eval_report import verdict, write_report
from model_export.progress import bar
from stages.filter import Filter
from stages.rerank_beam import Params as RerankParams
from stages.rerank_beam import fuse

COUNT = 20                          # served list length, top-k of every list metric
BEAM_WIDTHS = (1, 2, 4, 8, 16)
DEADLINE_MS = 10_000.0              # quality of the full funnel: no route or stage may be cut for time
CHUNK = 16_384                      # catalog rows per fine-ranker call
DISCOUNT = 1.0 / np.log2(np.arange(COUNT) + 2.0)
POSITIVE_TASK = "like"              # held-out positives (MovieLens: rating >= 4); else the first task
BASELINES = ("popularity", "itemknn", "ease")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle root or version folder")
    p.add_argument("--config", default=None,
                   help="serving config (default: the config the bundle was built from, which it carries)")
    p.add_argument("--users", type=int, default=300,
                   help="held-out users to sample, 0 = all (default %(default)s)")
    p.add_argument("--out", default="reports/eval",
                   help="folder for eval.json, eval.md and eval.png (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="user sample and random lists")


def run_eval(args: argparse.Namespace) -> int:
    report = evaluate(args.bundle, args.config, args.users, args.seed)
    text = write_report(report, Path(args.out))
    print(text)
    print(f"report: {Path(args.out) / 'eval.json'}, eval.md, eval.png")
    return 0


def _arms_config(cfg: Config, rerank: str) -> Config:
    """The served config without its experiments (every user gets control) plus one zero-share
    arm per beam width, so the sweep runs through the same engine, hydration and filters.
    Route timeouts are lifted to DEADLINE_MS: a route abandoned on a busy machine would make
    lists differ between arms for reasons that are not the arm."""
    raw = apply_overrides(cfg.raw, {f"stage.{n}.timeout_ms": DEADLINE_MS for n in cfg.pipeline.recall}, "eval")
    raw["experiments"] = {f"beam{b}": {"share": 0.0, "set": {f"stage.{rerank}.beam_width": b}}
                          for b in BEAM_WIDTHS}
    return parse_config(raw, cfg.path)


def positive_task(ds: Dataset) -> int:
    return ds.tasks.index(POSITIVE_TASK) if ds.truth is None and POSITIVE_TASK in ds.tasks else 0


def _population(ds: Dataset, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sampled users with held-out activity (with a held-out positive when there is no truth to
    score against), in the order of their cuts, and the context their requests carry."""
    rows = ds.valid.rows
    if ds.truth is None:
        rows = rows[ds.log_labels[rows, positive_task(ds)] > 0]
    users = np.unique(ds.log_user[rows])
    if 0 < n < users.size:
        users = np.sort(np.random.default_rng(seed).permutation(users)[:n])
    users = users[np.lexsort((users, ds.valid.cut[users]))]
    return users, contexts(ds, ds.valid, users)


def _eligible(filters: list[Filter], ctx: RequestContext, n_items: int) -> np.ndarray:
    """Catalog items the served pipeline's own filters let through for this request (seen,
    blocked, excluded; author_cap is a list-shape rule, not eligibility)."""
    c = Candidates.from_route(np.arange(n_items), np.zeros(n_items, np.float32), 1)
    for f in filters:
        c = f(ctx, c)
    return c.item


def _fine_probs(engine: Engine, ctx: RequestContext, items: np.ndarray) -> np.ndarray:
    """Fine-ranker task probabilities [n, T] for any items, with the features the stages build."""
    t = ctx.tables
    n_imp, n_pos, hot = engine.store.item_stats(items)
    seq, mask = featurize.sequence_input(t, ctx.user.recent)
    i2i = ctx.i2i.lookup(items)
    out = []
    for s in range(0, items.size, CHUNK):
        i, sl = items[s:s + CHUNK], slice(s, s + CHUNK)
        item_e = t.item_emb[i]
        x = featurize.coarse_features(t, i, ctx.user_e, item_e, ctx.user.recent, np.float32(ctx.user.n_imp),
                                      np.float32(ctx.user.n_pos), n_imp[sl], n_pos[sl], hot[sl], ctx.context, ctx.now,
                                      i2i[sl])
        out.append(engine.models.run("fine", {"user": ctx.ranker_user, "item": featurize.ranker_item_input(item_e, x),
                                              "seq": seq, "seq_mask": mask}))
    return np.concatenate(out)


def _fused(probs: np.ndarray, tasks: tuple[str, ...], p: RerankParams) -> np.ndarray:
    return fuse({t: probs[:, k] for k, t in enumerate(tasks)}, p.weights, p.fusion, p.eps)


def _top(items: np.ndarray, score: np.ndarray, k: int = COUNT) -> np.ndarray:
    """The k best `items` by `score` (aligned), best first."""
    top = np.argpartition(-score, k - 1)[:k] if k < items.size else np.arange(items.size)
    return items[top[np.argsort(-score[top], kind="stable")]]


def list_reward(fused: np.ndarray, category: np.ndarray, author: np.ndarray, p: RerankParams) -> float:
    """The beam search's objective for a given list, so lists of any beam width compare on it."""
    disc = 1.0 / np.log2(np.arange(fused.size) + 2.0)
    new_cat = np.unique(category, return_index=True)[1]
    return float(fused @ disc - p.category_penalty * (category[1:] == category[:-1]).sum()
                 - p.author_penalty * (author[1:] == author[:-1]).sum() + p.coverage_reward * new_cat.size)


def judge(items: np.ndarray, value: np.ndarray | None, positives: np.ndarray | None) -> dict[str, float]:
    """True utility under the ground truth when there is one; else recall@COUNT and binary
    NDCG@COUNT against the user's held-out positives."""
    if value is not None:
        return {"utility": float(value[items] @ DISCOUNT[:items.size])}
    hit = np.isin(items, positives)
    ideal = DISCOUNT[:min(positives.size, COUNT)].sum()
    return {f"recall@{COUNT}": float(hit.sum() / positives.size),
            f"ndcg@{COUNT}": float(DISCOUNT[:items.size][hit].sum() / ideal)}


class _Replay:
    """Moves the engine's feature store to each user's cut by reporting the training rows before
    it as events (impression, plus the first task where positive), in log order, and stops the
    clock at the cut; the refreshed routes (hot, cold start) then rebuild from it."""

    def __init__(self, engine: Engine, ds: Dataset, bundle: Bundle):
        self.engine, self.ds, self.at = engine, ds, 0
        self.primary = bundle.tasks[0]
        self.routes = {id(s.fn): s.fn for exp in [""] + list(engine.config.experiments)
                       for s in engine.pipeline(exp).recall if isinstance(s.fn, RefreshedRoute)}
        for fn in self.routes.values():
            fn.close()          # no background refresh racing the replay; `refresh()` below instead

    def to(self, cut: int, now: float) -> None:
        ds = self.ds
        rows = np.flatnonzero(ds.train_mask[self.at:cut]) + self.at
        if rows.size:
            ids, pos = ds.user_ids, ds.log_labels[rows, 0] > 0
            events = []
            for r, p in zip(rows.tolist(), pos.tolist()):
                u, i, t = int(ds.log_user[r]), int(ds.log_item[r]), float(ds.log_time[r])
                events.append(ResolvedEvent("impression", u, str(ids[u]), i, t))
                if p:
                    events.append(ResolvedEvent(self.primary, u, str(ids[u]), i, t))
            self.engine.store.apply(events)
        self.at = max(self.at, cut)
        self.engine.store.clock.t = now
        for fn in self.routes.values():
            fn.refresh()


def evaluate(bundle_path: str | Path, config_path: str | Path | None = None, n_users: int = 300,
             seed: int = 0) -> dict[str, Any]:
    """Run the evaluation and return the report (plain JSON types)."""
    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    cfg = load_config(config_path or bundle.config_path)
    ds = load_dataset(DataConfig(**m["config"]["data"]))
    if ds.truth is None:
        # The bundle's state holds the held-out rows, whose items its seen filter would drop: the
        # store starts empty at the log's start instead and replays the training rows (_Replay).
        st = snapshot(ds.log_user[:0], ds.log_item[:0], ds.log_time[:0], ds.log_labels[:0, 0], ds.n_users,
                      ds.n_items, 0.0, m["schema"]["recent_len"], m["schema"]["seen_len"],
                      m["state"]["half_life_days"])
        bundle = dataclasses.replace(bundle, state=st)
    rerank = next(n for n in cfg.pipeline.stages if cfg.stage[n][0] == "rerank_beam")
    store = EmbeddedStore(bundle)
    store.clock = StoppedClock(float(bundle.state.time))
    engine = Engine(_arms_config(cfg, rerank), bundle, store=store)
    try:
        report = _run(engine, bundle, cfg, ds, rerank, n_users, seed)
    finally:
        engine.close()
    report["verdict"] = verdict(report)
    return report


def _run(engine: Engine, bundle: Bundle, cfg: Config, ds: Dataset, rerank: str, n_users: int,
         seed: int) -> dict[str, Any]:
    m, t, item_index = bundle.manifest, bundle.tables, engine.item_index
    rp: RerankParams = cfg.stage[rerank][1]
    ann_k = min(next((cfg.stage[n][1].k for n in cfg.pipeline.recall if cfg.stage[n][0] == "recall_ann"),
                     m["index"]["recall_k"]), ds.n_items)
    n_items, category, author = ds.n_items, np.asarray(t.item_category), np.asarray(t.item_author)
    filters = [s.fn for s in engine.pipeline().stages if isinstance(s.fn, Filter) and s.fn.rule != "author_cap"]
    held_out = ds.truth is None
    users, ctx_rows = _population(ds, n_users, seed)
    replay = _Replay(engine, ds, bundle) if held_out else None
    learn = np.flatnonzero(ds.train_mask) if held_out else np.arange(len(ds.log_user))
    rank_pos = ds.rank.rows[ds.log_labels[ds.rank.rows, positive_task(ds)] > 0]
    base = Baselines.fit(ds, learn, ds.history_rows, rank_pos, seed)
    v = ds.valid.rows
    v = v[ds.log_labels[v, positive_task(ds)] > 0]
    pos_user, pos_item = ds.log_user[v], ds.log_item[v]
    rng = np.random.default_rng(seed)
    kinds = ("served", "ranker", *(() if held_out else ("oracle",)), *BASELINES, "random")
    lists: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    colds: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    quality: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    sweep = {b: {"ms": [], "reward": [], "quality": []} for b in BEAM_WIDTHS}
    queries, overlap, expected_random, faults, clocks = [], [], [], 0, []

    def serve(req: Request) -> tuple[np.ndarray, Response]:
        """Served item indices and the response; counts responses with anything cut or failed."""
        nonlocal faults
        r = engine.recommend(req)
        faults += r.degraded or any(s.status != "ok" for s in r.trace)
        return item_index.rows(r.item_ids).astype(np.int64), r

    for u, context in zip(bar(users, desc="eval users", unit="user"), ctx_rows):
        if replay is not None:
            replay.to(int(ds.valid.cut[u]), float(ds.valid.now[u]))
        clocks.append(engine.store.clock.days())
        req = Request(str(ds.user_ids[u]), COUNT, dict(zip(ds.context_fields, context.tolist())),
                      deadline_ms=DEADLINE_MS)
        ctx = engine.hydrate(req)
        queries.append(ctx.user_e[0])
        eligible = _eligible(filters, ctx, n_items)
        value = _fused(ds.truth.user_probs(int(u)), ds.tasks, rp) if not held_out else None
        positives = np.unique(pos_item[pos_user == u]) if held_out else None
        if value is not None:
            expected_random.append(float(value[eligible].mean() * DISCOUNT.sum()))
        served, _ = serve(req)
        ranker_top = _top(eligible, _fused(_fine_probs(engine, ctx, eligible), bundle.tasks, rp))
        overlap.append(np.isin(served, ranker_top).sum() / COUNT)
        built = {"served": served, "ranker": ranker_top,
                 "random": rng.choice(eligible, min(COUNT, eligible.size), replace=False)}
        for name, s in base.scores(np.array([u])).items():
            built[name] = _top(eligible, s[0][eligible])
        if value is not None:
            built["oracle"] = _top(eligible, value[eligible])
        for k in kinds:
            lists[k].append(built[k])
            colds[k].append(engine.store.item_stats(built[k])[0] == 0)
            quality[k].append(judge(built[k], value, positives))
        for b in BEAM_WIDTHS:
            items, r = serve(dataclasses.replace(req, experiment=f"beam{b}"))
            sweep[b]["ms"].append(next(s.ms for s in r.trace if s.name == rerank))
            sweep[b]["reward"].append(list_reward(r.scores.astype(np.float64), category[items], author[items], rp))
            sweep[b]["quality"].append(judge(items, value, positives))

    def mean(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}

    def normalise(rows: list[dict[str, float]]) -> dict[str, float]:
        if held_out:
            return {}
        lo = np.mean(expected_random)
        hi = np.mean([q["utility"] for q in quality["oracle"]])
        return {"utility_norm": float((np.mean([q["utility"] for q in rows]) - lo) / (hi - lo))}

    def shape(k: str) -> dict[str, float]:
        ls = lists[k]
        return {"diversity": float(np.mean([np.unique(category[x]).size for x in ls])),
                "coverage": float(np.unique(np.concatenate(ls)).size / n_items),
                "cold_share": float(np.mean(np.concatenate(colds[k])))}

    def per_user(k: str) -> dict[str, list[float]]:
        """Each user's metrics (for paired intervals); utility_norm with the run's random and oracle means."""
        out = {metric: [q[metric] for q in quality[k]] for metric in quality[k][0]}
        if not held_out:
            lo, hi = np.mean(expected_random), np.mean([q["utility"] for q in quality["oracle"]])
            out["utility_norm"] = [(u - lo) / (hi - lo) for u in out["utility"]]
        return out

    return {
        "bundle": {"path": str(bundle.path), "version": bundle.version, "dataset": m["dataset"],
                   "n_items": n_items, "n_users": ds.n_users},
        "config": cfg.path,
        "protocol": {
            "users": int(users.size), "user_ids": ds.user_ids[users].tolist(),    # per_user's order
            "seed": seed, "count": COUNT, "deadline_ms": DEADLINE_MS,
            "faulty_responses": int(faults), "split": ds.split,
            "held_out": ds.held_out if ds.split == "per_user" else None,
            "population": "users with validation-window activity" if not held_out
            else f"users with held-out positives ({POSITIVE_TASK if positive_task(ds) else ds.tasks[0]})",
            "state": (f"end of log (t={bundle.state.time:.2f} days, includes the validation window)" if not held_out
                      else "each user's cut: the training rows before it replayed into the store as events, "
                           "clock stopped at the cut" + (f" (t_valid = {ds.t_valid:.2f} days)"
                                                         if ds.split == "global" else " (their first held-out row)")),
            "clock_days": [float(np.min(clocks)), float(np.max(clocks))],
            "experiments": "control only (the config's experiments are not served)",
        },
        "ann": {"kind": m["index"]["kind"], "nprobe": m["index"]["nprobe"], "queries": len(queries), "served_k": ann_k,
                "build": {"k": m["index"]["recall_k"], "recall": m["index"]["recall"]},
                "recall": {str(k): measure_recall(engine.models.index, t.item_emb, np.stack(queries), k)
                           for k in sorted({ann_k, min(m["index"]["recall_k"], n_items)})}},
        "auc": {"source": "bundle manifest: computed by the build on the held-out rows",
                "models": {model: {k[4:]: v for k, v in ms.items() if k.startswith("auc_")}
                           for model, ms in m["metrics"].items() if any(k.startswith("auc_") for k in ms)}},
        "consistency": {f"overlap@{COUNT}": float(np.mean(overlap)),
                        "p10": float(np.percentile(overlap, 10)), "min": float(np.min(overlap))},
        "baselines": base.info,
        "lists": {k: {**mean(quality[k]), **normalise(quality[k]), **shape(k)} for k in kinds},
        "per_user": {k: per_user(k) for k in kinds},
        "beam_sweep": {"stage": rerank, "served_beam_width": rp.beam_width, "rows": [
            {"beam_width": b, "rerank_ms": float(np.mean(s["ms"])), "rerank_ms_p50": float(np.median(s["ms"])),
             "rerank_ms_p99": float(np.percentile(s["ms"], 99)),
             "reward": float(np.mean(s["reward"])), **mean(s["quality"]), **normalise(s["quality"])}
            for b, s in sweep.items()]},
    }
