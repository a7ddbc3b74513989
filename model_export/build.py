"""The whole offline pipeline: data -> four models -> ONNX + parity -> catalog embeddings -> faiss
-> feature state -> one checksummed bundle version (engine/bundle.py reads it), carrying the
config it was built from and its stages' side files, so it serves and evaluates from anywhere.

Parts of the log (model_export.dataset): the two-tower model and the item-to-item table train on
the history rows; the rankers on the rank rows with each user's state at their cut (global split:
[t_history, t_valid) with the state as of t_history); validation is the held-out rows with the
state at their cut; the bundle ships the state as of t_end, which seeds the serving feature store.
Logged impressions are the rankers' rows; data without impressions gets rows from offline recall
(model_export.implicit). The served i2i table is built from all training rows, the one the
rankers' training rows read from the history rows only, so no feature sees its own label.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core.bundle import MANIFEST, current_version, resolve
from engine.core.errors import BundleError, ConfigError
from engine.core.config import Config
from engine.core.featurize import COARSE_FEATURES, I2ITable, Tables, item_tower_input, user_tower_input
from engine.core.state import FeatureState, snapshot
from indexes import build_index, measure_recall, tune_nprobe
from model_export import cascade, cold_rows, distill, train
from model_export.bundle_writer import BundleWriter
from model_export.data import load_dataset
from model_export.dataset import Dataset
from model_export.export import PARITY_ROWS, export_checked, ort_session, parity_cases
from model_export.i2i import build_table
from model_export.implicit import implicit_rows
from model_export.models import save_checkpoints
from model_export.progress import bar
from stages.rerank_beam import fuse

RECALL_TARGET = 0.95        # IVF indexes: smallest nprobe reaching this recall@recall_k vs exact search
RECALL_MARGIN = 0.005       # tuned on other queries than it is reported on: aim a little higher
RECORDED_SECTIONS = ("data", "train", "index", "i2i", "implicit", "serving")   # raw config kept in the manifest
CONFIG_DIR = "config"       # the bundle's copy of its config file and the stages' side files


def build_bundle(cfg: Config, out_root: Path, force: bool = False) -> Path:
    """Train, export and write a bundle version under `out_root`; returns the version folder.

    A current version built from equal data/train/index sections is reused unless `force`.
    Torch state_dicts go to out_root/checkpoints/<version>/ (beside the bundle, not in it).
    """
    out_root = Path(out_root)
    fingerprint = cfg.fingerprint()
    side_files = _side_files(cfg)
    reusable = _reusable(out_root, fingerprint)
    if reusable is not None and not force:
        print(f"bundle {reusable.name} was built from this config (fingerprint {fingerprint}); reusing it")
        if _carried_differs(reusable, cfg, side_files):
            print(f"  its {CONFIG_DIR}/ copy differs from {cfg.path} outside the build keys (pipeline, serving, "
                  f"side files): serve with --config {cfg.path} to use the edited one, or --force to carry it")
        return reusable
    t0 = time.time()
    torch.set_num_threads(train.TRAIN_THREADS)
    torch.manual_seed(cfg.train.seed)
    writer = BundleWriter(out_root)
    try:
        carried = _carry_config(cfg, side_files, writer)
        manifest, checkpoints = _build(cfg, writer, fingerprint)
        manifest["config"]["file"] = carried
        manifest["build_seconds"] = round(time.time() - t0, 1)
        version = writer.commit(manifest)
    except BaseException:
        writer.abort()
        raise
    save_checkpoints(checkpoints, out_root / "checkpoints" / version.name)
    _print_metrics(manifest["metrics"])
    print(f"bundle {version} written in {manifest['build_seconds']:.1f} s")
    return version


def _reusable(out_root: Path, fingerprint: str) -> Path | None:
    if current_version(out_root) is None:
        return None
    try:
        vdir = resolve(out_root)
        manifest = json.loads((vdir / MANIFEST).read_text())
    except (BundleError, OSError, json.JSONDecodeError):
        return None
    recorded = manifest.get("config", {})
    # a version without its own config copy is rebuilt once, so every bundle served carries one
    return vdir if recorded.get("fingerprint") == fingerprint and recorded.get("file") else None


def _side_files(cfg: Config) -> list[str]:
    """The stages' side files (StageEnv.read_sidecar: whitelists, blocklists), over the control
    config and every experiment variant: each string parameter naming a file relative to the
    config. They travel with the bundle, so they must sit in the config's folder or below it."""
    base = Path(cfg.path).parent
    found: dict[str, None] = {}
    for c in (cfg, *(cfg.variant(e) for e in cfg.experiments)):
        for name, (_, params) in c.stage.items():
            for f in dataclasses.fields(params):
                value = getattr(params, f.name)
                if not isinstance(value, str) or not value or not (base / value).is_file():
                    continue
                rel = Path(value)
                if rel.is_absolute() or ".." in rel.parts:
                    raise ConfigError(f"stage.{name}.{f.name}: {value}: a side file must sit in the folder of "
                                      f"{cfg.path} or below it to travel with the bundle")
                found[rel.as_posix()] = None
    return list(found)


def _carry_config(cfg: Config, side_files: list[str], w: BundleWriter) -> str:
    """Copy the config file and its side files into the bundle; returns the config's path inside it."""
    src = Path(cfg.path)
    text = src.read_text()
    if tomllib.loads(text) != cfg.raw:
        raise ConfigError(f"{src}: changed since it was loaded, or loaded with --set overrides: a bundle "
                          "carries the exact config file it was built from")
    rel = f"{CONFIG_DIR}/{src.name}"
    w.path(rel).write_text(text)
    for side in side_files:
        shutil.copyfile(src.parent / side, w.path(f"{CONFIG_DIR}/{side}"))
    return rel


def _carried_differs(vdir: Path, cfg: Config, side_files: list[str]) -> bool:
    """Whether a reused version's config copy is not the config (and side files) given now."""
    carried = vdir / json.loads((vdir / MANIFEST).read_text())["config"]["file"]
    pairs = [(Path(cfg.path), carried)] + [(Path(cfg.path).parent / s, carried.parent / s) for s in side_files]
    return any(not b.is_file() or a.read_bytes() != b.read_bytes() for a, b in pairs)


def _build(cfg: Config, w: BundleWriter, fingerprint: str) -> tuple[dict[str, Any], dict[str, torch.nn.Module]]:
    tc = cfg.train
    step = _Steps()
    ds = step("data", lambda: load_dataset(cfg.data))
    print(f"data {ds.name}: {ds.n_users} users, {ds.n_items} items, {len(ds.log_user)} "
          f"{'interactions' if ds.implicit else 'impressions'}, tasks {ds.tasks}, {ds.split} split: "
          f"{ds.history_rows.size} history, {ds.rank.rows.size} rank, {ds.valid.rows.size} held-out rows")
    if ds.implicit and tc.rank_cold_share > 0:
        raise ConfigError("train.rank_cold_share: cold views re-featurize logged impressions; this data has none")
    if ds.split != "global" and not ds.implicit:
        raise ConfigError("data.split: per_user needs data without impressions (logged impressions are "
                          "featurised with one state per window)")
    half_life = cfg.serving.hot_half_life_hours / 24

    def state(t: float) -> FeatureState:
        return snapshot(ds.log_user, ds.log_item, ds.log_time, ds.log_labels[:, 0], ds.n_users, ds.n_items, t,
                        tc.recent_len, cfg.serving.seen_window, half_life)

    def states() -> list[FeatureState]:
        if ds.split == "global":
            return [state(t) for t in (ds.t_history, ds.t_valid, ds.t_end)]
        return [*(cascade.user_state(ds, p, tc.recent_len, cfg.serving.seen_window, half_life)
                  for p in (ds.rank, ds.valid)), state(ds.t_end)]

    st_hist, st_valid, st_end = step("feature state", states)
    i2i_hist, i2i_served, i2i_meta = step("i2i tables", lambda: _i2i_tables(ds, cfg))
    content = (ds.item_content / np.maximum(np.linalg.norm(ds.item_content, axis=1, keepdims=True), 1e-6)
               ).astype(np.float32)
    tt = step("two-tower", lambda: train.fit_two_tower(ds, content, tc, st_hist))
    rng = np.random.default_rng(tc.seed)
    models: dict[str, Any] = {}

    # towers: export with parity, then the whole catalog through the exported item tower
    tables = train.serving_tables(ds, content, tt.tables, i2i_served)
    users = rng.choice(ds.n_users, min(PARITY_ROWS, ds.n_users), replace=False)
    users[0] = -1                                                    # a new user: zero id row, no history
    u_x = user_tower_input(tables, users, ds.user_profile[np.maximum(users, 0)],
                           ds.log_context[rng.integers(0, len(ds.log_user), users.size)],
                           np.where(users[:, None] >= 0, st_valid.user_recent[np.maximum(users, 0)], -1))
    i_x = item_tower_input(tables, tt.tables["category_emb"], tt.tables["author_emb"],
                           rng.choice(ds.n_items, min(PARITY_ROWS, ds.n_items), replace=False))
    for name, tower, x in (("user_tower", tt.model.user_tower, u_x), ("item_tower", tt.model.item_tower, i_x)):
        models[name] = _onnx_entry(name, tower, step(f"export {name}", lambda: export_checked(
            name, tower, w.path(f"models/{name}.onnx"), [{"x": x[:1]}, {"x": x}], tc.parity_tol)))
    item_sess, user_sess = (ort_session(w.path(f"models/{n}.onnx")) for n in ("item_tower", "user_tower"))

    def user_emb(x: np.ndarray) -> np.ndarray:
        return user_sess.run(None, {"x": x})[0]

    step("embed catalog", lambda: train.embed_catalog(tables, tt.tables, lambda x: item_sess.run(None, {"x": x})[0]))
    metrics: dict[str, dict[str, float]] = {
        "two_tower": train.two_tower_recall(ds, tables, user_emb, st_valid, ds.valid)}
    print("  two-tower validation " + ", ".join(f"{k} {v:.4g}" for k, v in metrics["two_tower"].items()))

    # rankers: rows of the rank part (each user's state at its cut, the i2i table of the history
    # rows) and of the held-out part (state at its cut, the served i2i table)
    train_tables = dataclasses.replace(tables, i2i=i2i_hist)
    schema = _schema(ds, cfg)
    if ds.implicit:
        got = [step("ranker rows", lambda: implicit_rows(ds, cfg, tbl, schema, user_emb, phase, rng))
               for tbl, phase in ((train_tables, ds.rank), (tables, ds.valid))]
        tr, va = (g.rows for g in got)
        metrics["implicit_rows"] = {f"{part}_{k}": v for part, g in zip(("train", "valid"), got)
                                    for k, v in g.stats.items()}
        print("  implicit rows " + ", ".join(f"{k} {v:.4g}" for k, v in metrics["implicit_rows"].items()))
    else:
        rank_rows = _sample(ds.rank.rows, tc.max_rank_rows, rng)
        valid_rows = _sample(ds.valid.rows, tc.max_rank_rows, rng)
        tr = step("ranker features", lambda: train.ranker_rows(ds, train_tables, rank_rows, st_hist, user_emb,
                                                               "train"))
        va = step("ranker features", lambda: train.ranker_rows(ds, tables, valid_rows, st_valid, user_emb, "valid"))
        if tc.rank_cold_share > 0:
            cold_tables = cold_rows.content_only(train_tables, tt.tables, lambda x: item_sess.run(None, {"x": x})[0])
            step("cold rows", lambda: cold_rows.mask_history(ds, tr, rank_rows, cold_tables, st_hist, user_emb,
                                                             tc.rank_cold_share, rng))
    # the fine ranker first: with distillation it teaches the coarse stages
    fine, metrics["fine"] = step("fine ranker", lambda: train.fit_fine(tr, va, tables, ds.tasks, tc))
    teach = step("cascade samples", lambda: distill.cascade_samples(
        ds, cfg, train_tables, schema, user_emb, ds.rank, fine, _fusion(cfg, ds.tasks), tc.distill_users, rng)) \
        if tc.distill_weight > 0 else None
    booster, metrics["coarse_trees"] = step("coarse trees", lambda: train.fit_gbdt(
        tr, va, ds.tasks[0], tc, teach.soft_rows() if teach is not None else None))
    booster.save_model(str(w.path("models/coarse_trees.txt")))
    models["coarse_trees"] = {"file": "models/coarse_trees.txt", "inputs": list(COARSE_FEATURES), "outputs": ["p"],
                              "trees": booster.num_trees(), "leaves": tc.gbdt_leaves}
    aux = (lambda model: distill.Listwise(model, teach, len(tr.user), tc)) if teach is not None else None
    dnn, metrics["coarse_dnn"] = step("coarse dnn", lambda: train.fit_coarse_dnn(tr, va, tc.embed_dim, ds.tasks[0], tc,
                                                                                  aux))
    cases = {name: parity_cases(name, va, tables) for name in ("coarse_dnn", "fine")}
    for name, model in (("coarse_dnn", dnn), ("fine", fine)):
        models[name] = _onnx_entry(name, model, step(f"export {name}", lambda: export_checked(
            name, model, w.path(f"models/{name}.onnx"), cases[name], tc.parity_tol)))

    # index over the catalog, recall checked on real user queries (validation-window impressions)
    index_meta = step("faiss index", lambda: _index(ds, cfg, tables, user_emb, st_end, w, rng))

    arrays = {**{f"tables/{k}.npy": v for k, v in (
        ("item_emb", tables.item_emb), ("item_id_emb", tables.item_id_emb), ("item_category", ds.item_category),
        ("item_author", ds.item_author), ("item_content", tables.item_content), ("item_created", ds.item_created),
        ("user_id_emb", tables.user_id_emb), ("user_profile", ds.user_profile), ("user_ids", ds.user_ids),
        ("item_ids", ds.item_ids), ("category_emb", tt.tables["category_emb"]),
        ("author_emb", tt.tables["author_emb"]))},
        **({f"tables/i2i_{k}.npy": getattr(i2i_served, k) for k in ("indptr", "indices", "weights")}
           if i2i_served is not None else {}),
        **{f"state/{k}.npy": v for k, v in st_end.arrays().items()}}
    for rel, a in arrays.items():
        w.array(rel, a)
    manifest = {
        "config": {"path": cfg.path, "fingerprint": fingerprint,
                   **{s: cfg.raw.get(s, {}) for s in RECORDED_SECTIONS}},
        "dataset": ds.name,
        "data": {"split": ds.split, "implicit": ds.implicit, "rows": {
            "history": int(ds.history_rows.size), "rank": int(ds.rank.rows.size), "held_out": int(ds.valid.rows.size)}},
        "schema": _schema(ds, cfg),
        "state": {"t_ref": st_end.t_ref, "time": st_end.time, "half_life_days": half_life},
        "time": {"t_end": ds.t_end, "days_per_unix_second": 1 / 86400},
        "index": index_meta,
        **({"i2i": i2i_meta} if i2i_served is not None else {}),
        "models": models,
        "metrics": metrics,
        "shapes": {rel: list(a.shape) for rel, a in arrays.items()},
        "step_seconds": step.seconds,
    }
    return manifest, {"two_tower": tt.model, "coarse_dnn": dnn, "fine": fine}


def _fusion(cfg: Config, tasks: tuple[str, ...]) -> distill.Fusion:
    """The served rerank's fusion of task probabilities; without a rerank stage, the first task."""
    rerank = next((cfg.stage[n][1] for n in cfg.pipeline.stages if cfg.stage[n][0] == "rerank_beam"), None)
    if rerank is None:
        return lambda probs: probs[:, 0]
    return lambda probs: fuse({t: probs[:, j] for j, t in enumerate(tasks)}, rerank.weights, rerank.fusion, rerank.eps)


class _Steps:
    """Runs named steps and keeps their wall times for the manifest."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn):
        t = time.time()
        out = fn()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - t, 2)
        return out


def _onnx_entry(name: str, model: torch.nn.Module, parity: float) -> dict[str, Any]:
    return {"file": f"models/{name}.onnx", "inputs": list(model.onnx_inputs), "outputs": list(model.onnx_outputs),
            "parity_max_abs_diff": parity}


def _sample(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """All rows, or a sorted random sample of `cap` (max_rank_rows keeps memory in check at 1M items)."""
    return rows if cap <= 0 or rows.size <= cap else np.sort(rng.choice(rows, cap, replace=False))


def _index(ds: Dataset, cfg: Config, tables: Tables, user_emb: train.EmbedFn, st: FeatureState,
           w: BundleWriter, rng: np.random.Generator) -> dict[str, Any]:
    # nprobe is tuned on one set of real user queries and recall reported on another: tuned
    # and measured on the same queries, 0.95 came out 0.943-0.956 on fresh ones.
    rows = _sample(ds.valid.rows, 2 * cfg.index.recall_queries, rng)
    u = ds.log_user[rows]
    queries = user_emb(user_tower_input(tables, u, ds.user_profile[u], ds.log_context[rows], st.user_recent[u]))
    tune_q, held_q = queries[::2], queries[1::2]
    ic = cfg.index
    index = build_index(tables.item_emb, ic.kind, ic.nlist, ic.nprobe, ic.train_size, progress=bar)
    k = min(cfg.index.recall_k, ds.n_items)
    if index.kind != "flat":
        tune_nprobe(index, tables.item_emb, tune_q, k, RECALL_TARGET + RECALL_MARGIN)
    recall_at = {kk: measure_recall(index, tables.item_emb, held_q, kk) for kk in sorted({k, min(1000, k)})}
    print(f"  index {index.kind}: nlist {index.nlist}, nprobe {index.nprobe}, "
          + ", ".join(f"recall@{kk} {r:.4f}" for kk, r in recall_at.items())
          + f" on {len(held_q)} held-out user queries")
    index.save(w.path("index/items.faiss"))
    return {"kind": index.kind, "nlist": index.nlist, "nprobe": index.nprobe, "recall_k": k,
            "recall": recall_at[k], "recall_at": {str(kk): r for kk, r in recall_at.items()}}


def _i2i_tables(ds: Dataset, cfg: Config) -> tuple[I2ITable | None, I2ITable | None, dict[str, Any]]:
    """The item-to-item tables of the history rows (for training rows) and of all training rows
    (served), from the first task's positives; None twice when i2i.neighbours is 0."""
    if cfg.i2i.neighbours == 0:
        return None, None, {}
    pos = ds.log_labels[:, 0] > 0

    def table(rows: np.ndarray) -> tuple[I2ITable, dict[str, Any]]:
        rows = rows[pos[rows]]
        return build_table(cfg.i2i, ds.log_user[rows], ds.log_item[rows], ds.n_users, ds.n_items)

    hist, _ = table(ds.history_rows)
    served, meta = table(np.flatnonzero(ds.train_mask))
    print(f"  i2i {meta['method']}: {meta['nnz']} neighbours over {ds.n_items} items from {meta['interactions']} "
          f"interactions in {meta['seconds']:.1f} s")
    return hist, served, meta


def _schema(ds: Dataset, cfg: Config) -> dict[str, Any]:
    return {"tasks": list(ds.tasks), "profile_fields": list(ds.profile_fields),
            "profile_cardinality": list(ds.profile_cardinality), "context_fields": list(ds.context_fields),
            "context_cardinality": list(ds.context_cardinality), "coarse_features": list(COARSE_FEATURES),
            "recent_len": cfg.train.recent_len, "seen_len": cfg.serving.seen_window,
            "embed_dim": cfg.train.embed_dim, "id_dim": cfg.train.id_dim, "n_users": ds.n_users,
            "n_items": ds.n_items, "n_categories": ds.n_categories, "n_authors": ds.n_authors}


def _print_metrics(metrics: dict[str, dict[str, float]]) -> None:
    print(f"\n{'model':<14} {'metric':<26} {'value':>8}")
    for model, ms in metrics.items():
        for k, v in ms.items():
            print(f"{model:<14} {k:<26} {v:>8.4g}")
