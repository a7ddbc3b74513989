"""`recserve eval`: how good the served lists are, end to end, on held-out users.

Model AUCs say little about what a user is shown; this asks the engine itself for each
sampled user's list and scores it: against exact search (ANN recall), against the fine
ranker run over the whole eligible catalog (did the funnel cut the items the ranker likes
best?), against the synthetic world's ground truth (normalised utility: random 0, oracle 1),
or, on MovieLens, against the held-out period's positives. docs/quality.md reads the report.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.core import featurize
from engine.core.bundle import Bundle, load_bundle
from engine.core.candidates import Candidates
from engine.core.config import Config, DataConfig, apply_overrides, load_config, parse_config
from engine.core.context import RequestContext
from engine.core.runner import Engine
from engine.core.request import Request, Response
from engine.core.state import snapshot
from engine.store.embedded import EmbeddedStore
from indexes import measure_recall
from model_export.data import load_dataset
from model_export.dataset import Dataset
from model_export.progress import bar
from stages.filter import Filter
from stages.rerank_beam import Params as RerankParams
from stages.rerank_beam import fuse

COUNT = 20                          # served list length, top-k of every list metric
BEAM_WIDTHS = (1, 2, 4, 8, 16)
DEADLINE_MS = 10_000.0              # quality of the full funnel: no route or stage may be cut for time
CHUNK = 16_384                      # catalog rows per fine-ranker call
DISCOUNT = 1.0 / np.log2(np.arange(COUNT) + 2.0)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle root or version folder")
    p.add_argument("--config", default=None,
                   help="serving config (default: the config the bundle was built from, which it carries)")
    p.add_argument("--users", type=int, default=300, help="held-out users to sample (default %(default)s)")
    p.add_argument("--out", default="reports/eval", help="folder for eval.json and eval.md (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="user sample and random lists")


def run_eval(args: argparse.Namespace) -> int:
    report = evaluate(args.bundle, args.config, args.users, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    (out / "eval.md").write_text(markdown(report))
    print(markdown(report))
    print(f"report: {out / 'eval.json'}, {out / 'eval.md'}")
    return 0


class _StoppedClock:
    """The store's clock held at the state's time: cold-start windows and item ages then do not
    drift with the bundle's age, so the same bundle gives the same report next week."""

    def __init__(self, t: float):
        self.t = t

    def days(self, unix: float | None = None) -> float:
        return self.t


def _arms_config(cfg: Config, rerank: str) -> Config:
    """The served config without its experiments (every user gets control) plus one zero-share
    arm per beam width, so the sweep runs through the same engine, hydration and filters.
    Route timeouts are lifted to DEADLINE_MS: a route abandoned on a busy machine would make
    lists differ between arms for reasons that are not the arm."""
    raw = apply_overrides(cfg.raw, {f"stage.{n}.timeout_ms": DEADLINE_MS for n in cfg.pipeline.recall}, "eval")
    raw["experiments"] = {f"beam{b}": {"share": 0.0, "set": {f"stage.{rerank}.beam_width": b}}
                          for b in BEAM_WIDTHS}
    return parse_config(raw, cfg.path)


def _held_out(ds: Dataset, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sampled users with validation-window activity (with positives when there is no truth to
    score against) and each one's first validation row, whose context the request carries."""
    rows = ds.window(ds.t_valid, ds.t_end)
    if ds.truth is None:
        rows = rows[ds.log_labels[rows, 0] > 0]
    users, first = np.unique(ds.log_user[rows], return_index=True)
    pick = np.sort(np.random.default_rng(seed).permutation(users.size)[:n])
    return users[pick], rows[first[pick]]


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
    out = []
    for s in range(0, items.size, CHUNK):
        i, sl = items[s:s + CHUNK], slice(s, s + CHUNK)
        item_e = t.item_emb[i]
        x = featurize.coarse_features(t, i, ctx.user_e, item_e, ctx.user.recent, np.float32(ctx.user.n_imp),
                                      np.float32(ctx.user.n_pos), n_imp[sl], n_pos[sl], hot[sl], ctx.context, ctx.now)
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


def _judge(items: np.ndarray, value: np.ndarray | None, positives: np.ndarray | None) -> dict[str, float]:
    """True utility under the ground truth when there is one; else recall@COUNT and binary
    NDCG@COUNT against the user's held-out positives."""
    if value is not None:
        return {"utility": float(value[items] @ DISCOUNT[:items.size])}
    hit = np.isin(items, positives)
    ideal = DISCOUNT[:min(positives.size, COUNT)].sum()
    return {f"recall@{COUNT}": float(hit.sum() / positives.size),
            f"ndcg@{COUNT}": float(DISCOUNT[:items.size][hit].sum() / ideal)}


def evaluate(bundle_path: str | Path, config_path: str | Path | None = None, n_users: int = 300,
             seed: int = 0) -> dict[str, Any]:
    """Run the evaluation and return the report (plain JSON types)."""
    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    cfg = load_config(config_path or bundle.config_path)
    ds = load_dataset(DataConfig(**m["config"]["data"]))
    if ds.truth is None:
        # Held-out protocol: the bundle's state already holds the validation window, so its seen
        # filter would drop every held-out positive. Serve from the state as of t_valid instead,
        # built exactly as the build builds its states (the models never trained on that window).
        st = snapshot(ds.log_user, ds.log_item, ds.log_time, ds.log_labels[:, 0], ds.n_users, ds.n_items,
                      ds.t_valid, m["schema"]["recent_len"], m["schema"]["seen_len"], m["state"]["half_life_days"])
        bundle = dataclasses.replace(bundle, state=st)
    rerank = next(n for n in cfg.pipeline.stages if cfg.stage[n][0] == "rerank_beam")
    rp: RerankParams = cfg.stage[rerank][1]
    ann_k = min(next((cfg.stage[n][1].k for n in cfg.pipeline.recall if cfg.stage[n][0] == "recall_ann"),
                     m["index"]["recall_k"]), ds.n_items)
    store = EmbeddedStore(bundle)
    store.clock = _StoppedClock(float(bundle.state.time))
    engine = Engine(_arms_config(cfg, rerank), bundle, store=store)
    try:
        return _run(engine, bundle, cfg, ds, rerank, rp, ann_k, n_users, seed)
    finally:
        engine.close()


def _run(engine: Engine, bundle: Bundle, cfg: Config, ds: Dataset, rerank: str, rp: RerankParams,
         ann_k: int, n_users: int, seed: int) -> dict[str, Any]:
    st, t, item_index = bundle.state, bundle.tables, engine.item_index
    n_items, category, author = ds.n_items, np.asarray(t.item_category), np.asarray(t.item_author)
    filters = [s.fn for s in engine.pipeline().stages if isinstance(s.fn, Filter) and s.fn.rule != "author_cap"]
    popular = np.argsort(-np.asarray(st.item_n_pos), kind="stable")
    cold = np.asarray(st.item_n_imp) == 0
    users, ctx_rows = _held_out(ds, n_users, seed)
    rng = np.random.default_rng(seed)
    v = ds.window(ds.t_valid, ds.t_end)
    v = v[ds.log_labels[v, 0] > 0]
    pos_user, pos_item = ds.log_user[v], ds.log_item[v]
    kinds = ("served", "ranker", "oracle", "popular", "random") if ds.truth is not None \
        else ("served", "ranker", "popular", "random")
    lists: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    quality: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    sweep = {b: {"ms": [], "reward": [], "quality": []} for b in BEAM_WIDTHS}
    queries, overlap, expected_random, faults = [], [], [], 0

    def serve(req: Request) -> tuple[np.ndarray, Response]:
        """Served item indices and the response; counts responses with anything cut or failed."""
        nonlocal faults
        r = engine.recommend(req)
        faults += r.degraded or any(s.status != "ok" for s in r.trace)
        return np.array([item_index[i] for i in r.item_ids], np.int64), r

    for u, row in zip(bar(users, desc="eval users", unit="user"), ctx_rows):
        req = Request(str(ds.user_ids[u]), COUNT, dict(zip(ds.context_fields, ds.log_context[row].tolist())),
                      deadline_ms=DEADLINE_MS)
        ctx = engine.hydrate(req)
        queries.append(ctx.user_e[0])
        eligible = _eligible(filters, ctx, n_items)
        mask = np.zeros(n_items, bool)
        mask[eligible] = True
        value = _fused(ds.truth.user_probs(int(u)), ds.tasks, rp) if ds.truth is not None else None
        positives = np.unique(pos_item[pos_user == u]) if value is None else None
        if value is not None:
            expected_random.append(float(value[eligible].mean() * DISCOUNT.sum()))
        served, _ = serve(req)
        ranker_top = _top(eligible, _fused(_fine_probs(engine, ctx, eligible), bundle.tasks, rp))
        overlap.append(np.isin(served, ranker_top).sum() / COUNT)
        built = {"served": served, "ranker": ranker_top, "popular": popular[mask[popular]][:COUNT],
                 "random": rng.choice(eligible, min(COUNT, eligible.size), replace=False)}
        if value is not None:
            built["oracle"] = _top(eligible, value[eligible])
        for k in kinds:
            lists[k].append(built[k])
            quality[k].append(_judge(built[k], value, positives))
        for b in BEAM_WIDTHS:
            items, r = serve(dataclasses.replace(req, experiment=f"beam{b}"))
            sweep[b]["ms"].append(next(s.ms for s in r.trace if s.name == rerank))
            sweep[b]["reward"].append(list_reward(r.scores.astype(np.float64), category[items], author[items], rp))
            sweep[b]["quality"].append(_judge(items, value, positives))

    def mean(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}

    def normalise(rows: list[dict[str, float]]) -> dict[str, float]:
        if ds.truth is None:
            return {}
        lo = np.mean(expected_random)
        hi = np.mean([q["utility"] for q in quality["oracle"]])
        return {"utility_norm": float((np.mean([q["utility"] for q in rows]) - lo) / (hi - lo))}

    def shape(ls: list[np.ndarray]) -> dict[str, float]:
        return {"diversity": float(np.mean([np.unique(category[x]).size for x in ls])),
                "coverage": float(np.unique(np.concatenate(ls)).size / n_items),
                "cold_share": float(np.mean(np.concatenate([cold[x] for x in ls])))}

    m = bundle.manifest
    return {
        "bundle": {"path": str(bundle.path), "version": bundle.version, "dataset": m["dataset"],
                   "n_items": n_items, "n_users": ds.n_users},
        "config": cfg.path,
        "protocol": {
            "users": int(users.size), "seed": seed, "count": COUNT, "deadline_ms": DEADLINE_MS,
            "faulty_responses": int(faults),
            "population": "users with validation-window activity" if ds.truth is not None
            else "users with validation-window positives (rating >= 4)",
            "state": (f"end of log (t={st.time:.2f} days, includes the validation window)" if ds.truth is not None
                      else f"as of t_valid (t={st.time:.2f} days): the bundle's own state includes the "
                           "validation window, whose items its seen filter would drop"),
            "clock_days": float(st.time), "experiments": "control only (the config's experiments are not served)",
        },
        "ann": {"kind": m["index"]["kind"], "nprobe": m["index"]["nprobe"], "queries": len(queries), "served_k": ann_k,
                "build": {"k": m["index"]["recall_k"], "recall": m["index"]["recall"]},
                "recall": {str(k): measure_recall(engine.models.index, t.item_emb, np.stack(queries), k)
                           for k in sorted({ann_k, min(m["index"]["recall_k"], n_items)})}},
        "auc": {"source": "bundle manifest: computed by the build on the validation window",
                "models": {model: {k[4:]: v for k, v in ms.items() if k.startswith("auc_")}
                           for model, ms in m["metrics"].items() if any(k.startswith("auc_") for k in ms)}},
        "consistency": {f"overlap@{COUNT}": float(np.mean(overlap)),
                        "p10": float(np.percentile(overlap, 10)), "min": float(np.min(overlap))},
        "lists": {k: {**mean(quality[k]), **normalise(quality[k]), **shape(lists[k])} for k in kinds},
        "beam_sweep": {"stage": rerank, "served_beam_width": rp.beam_width, "rows": [
            {"beam_width": b, "rerank_ms": float(np.mean(s["ms"])), "rerank_ms_p50": float(np.median(s["ms"])),
             "rerank_ms_p99": float(np.percentile(s["ms"], 99)),
             "reward": float(np.mean(s["reward"])), **mean(s["quality"]), **normalise(s["quality"])}
            for b, s in sweep.items()]},
    }


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    return "\n".join([f"| {' | '.join(cols)} |", f"|{'---|' * len(cols)}",
                      *(f"| {' | '.join(cell(r.get(c, '')) for c in cols)} |" for r in rows)])


def markdown(r: dict[str, Any]) -> str:
    """The report as Markdown, every number from the JSON."""
    p, a, c = r["protocol"], r["ann"], r["consistency"]
    k = p["count"]
    list_cols = ["list", *next(iter(r["lists"].values())).keys()]
    sweep_cols = list(r["beam_sweep"]["rows"][0])
    auc = [{"model": mo, **ts} for mo, ts in r["auc"]["models"].items()]
    auc_cols = sorted({t for row in auc for t in row} - {"model"})
    return "\n\n".join([
        f"# Evaluation of bundle {r['bundle']['version']} ({r['bundle']['dataset']})",
        f"Config `{r['config']}`; {p['users']} {p['population']} (seed {p['seed']}); lists of {p['count']}; "
        f"feature state {p['state']}; clock stopped at day {p['clock_days']:.2f}; {p['experiments']}; "
        f"deadline and route timeouts {p['deadline_ms']:.0f} ms ({p['faulty_responses']} responses with a route or "
        "stage cut, failed or skipped).",
        f"## ANN recall\n\nRecall@k of the {a['kind']} index (nprobe {a['nprobe']}) against exact inner-product search "
        f"over item_emb, on the {a['queries']} users' real user-tower embeddings (one query per user): "
        + ", ".join(f"**{v:.4f}** at k={k}" for k, v in a["recall"].items())
        + f". The ann route asks for k={a['served_k']}; the build measured {a['build']['recall']:.4f} at "
        f"k={a['build']['k']} on its own queries (sampled validation impressions).",
        f"## AUC\n\nFrom the {r['auc']['source']}.\n\n" + _table(auc, ["model", *auc_cols]),
        f"## Pipeline consistency\n\nShare of the served top-{k} that is also in the top-{k} of the fine ranker + "
        f"fusion over the whole eligible catalog (same seen/blocked/excluded filters): mean "
        f"**{c[f'overlap@{k}']:.4f}**, p10 {c['p10']:.4f}, min {c['min']:.4f}.",
        "## Lists\n\nserved: the engine's list; ranker: top by fine ranker + fusion over the whole eligible "
        "catalog (no funnel, no beam); oracle: top by true fused value; popular: top by positives in the "
        "state; random: uniform. All from the same eligible items. utility: sum over positions of the true "
        "fused value / log2(pos + 2), with the served rerank's fusion; utility_norm: (mean utility - mean "
        "expected utility of a uniform list) / (oracle's - that). diversity: distinct categories per list; "
        "coverage: distinct items over all users / catalog; cold_share: served slots holding items without "
        "impressions in the state.\n\n" + _table([{"list": k, **v} for k, v in r["lists"].items()], list_cols),
        f"## Beam width (stage `{r['beam_sweep']['stage']}`, served width {r['beam_sweep']['served_beam_width']})\n\n"
        "Each width served to the same users through the same engine; rerank ms from the response trace; "
        "reward: the beam search's own objective (fused score / log2(pos + 2) minus category and author "
        "repeat penalties plus the coverage reward) of the served list.\n\n"
        + _table(r["beam_sweep"]["rows"], sweep_cols),
    ]) + "\n"
