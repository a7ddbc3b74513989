"""Training loops and validation metrics of the four models.

Every ranker input is built by engine/featurize.py from the same tables and feature state
the server uses (the state as of the start of each window: `snapshot` at t_history for the
ranker window, at t_valid for validation; with data without impressions, each user's state
at their cut, model_export.implicit), so a feature cannot drift between training and
serving. Two-tower pairs take the user's history point-in-time via `recent_before`.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import lightgbm as lgb
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.core.sections import TrainConfig
from engine.core.featurize import (COARSE_FEATURES, I2ITable, Tables, coarse_features, i2i_pairs, item_tower_input, one_hot,
                                   ranker_item_input, ranker_user_dim, ranker_user_input, sequence_input,
                                   user_tower_input)
from engine.core.state import FeatureState, recent_before
from indexes import exact_ids
from model_export.cascade import UserStates
from model_export.dataset import Dataset, Phase
from model_export.models import MMoE, CoarseDNN, TwoTower
from model_export.position import label_loss
from model_export.progress import bar

EXAM_REPORTED = (1, 4, 9, 19)          # slots whose examination probability the build reports

EmbedFn = Callable[[np.ndarray], np.ndarray]   # dense tower input [B, D] -> embeddings [B, d]
# One thread for torch and LightGBM. Measured on this 2-core machine while other processes ran:
# OpenMP's spin-waiting made 2 threads 4x (LightGBM, 40 trees on 300k rows) to 25x (MMoE step)
# slower in wall time than 1; on a quiet machine 2 threads could at best halve the training time.
TRAIN_THREADS = 1


def auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC by average ranks (ties count half); nan when one class is absent."""
    y = np.asarray(y).astype(bool)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inv, cnt = np.unique(s, return_inverse=True, return_counts=True)
    rank = (np.cumsum(cnt) - (cnt - 1) / 2)[inv]
    return float((rank[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _train_loop(model: nn.Module, n_rows: int, epochs: int, cfg: TrainConfig, desc: str,
                loss_fn: Callable[[np.ndarray], Tensor], evaluate: Callable[[], dict[str, float]] | None = None,
                select: str | None = None) -> dict[str, float]:
    """Adam over shuffled mini-batches with a progress bar; prints the validation metric per epoch.

    `select`: keep the weights of the epoch with the highest `evaluate()[select]` (early stopping)."""
    sparse = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]
    dense = [p for p in model.parameters() if all(p is not q for q in sparse)]
    opts = [torch.optim.Adam(dense, lr=cfg.lr, fused=True)]   # one kernel: 6x faster on CPU
    if sparse:   # lazy Adam on the rows a batch touched: a dense step over a 1M-row table costs ~0.25 s
        opts.append(torch.optim.SparseAdam(sparse, lr=cfg.lr))
    rng = np.random.default_rng(cfg.seed)
    metrics: dict[str, float] = {}
    best: tuple[float, int, dict[str, Tensor]] | None = None
    for ep in range(epochs):
        model.train()
        perm = rng.permutation(n_rows)
        batches = bar(range(0, n_rows, cfg.batch_size), desc=f"{desc} {ep + 1}/{epochs}", unit="batch")
        total = 0.0
        for k, s in enumerate(batches, 1):
            loss = loss_fn(np.sort(perm[s:s + cfg.batch_size]))
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
            total += loss.item()
            if k % 20 == 0:
                batches.set_postfix(loss=f"{total / k:.4f}")
        model.eval()
        if evaluate is not None:
            with torch.no_grad():
                metrics = evaluate()
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        print(f"  {desc} epoch {ep + 1}/{epochs}: train loss {total / max(len(batches), 1):.4f} {shown}")
        if select is not None and (best is None or metrics[select] > best[0]):
            best = (metrics[select], ep, copy.deepcopy(model.state_dict()))
    if best is not None:
        model.load_state_dict(best[2])
        print(f"  {desc}: keeping epoch {best[1] + 1} ({select} {best[0]:.4f})")
    return metrics


# ---------------------------------------------------------------- two-tower retrieval

@dataclass
class TwoTowerFit:
    model: TwoTower
    tables: dict[str, np.ndarray]    # user_id_emb, item_id_emb, category_emb, author_emb (unseen rows zero)


def fit_two_tower(ds: Dataset, content: np.ndarray, cfg: TrainConfig, state: FeatureState) -> TwoTowerFit:
    """Sampled softmax over history-window positives with mixed negatives (Yang et al. 2020, MNS):
    the other positives of the batch plus `tt_uniform_negatives` items drawn uniformly from the
    whole catalog, logQ-corrected for that mixed proposal, with id dropout.

    In-batch negatives alone are all items somebody clicked: the long tail of never-clicked
    items is never pushed away and crowds the top of an exact search over a large catalog. A
    uniform negative keeps its id row only if the item has one at serving (trained positives).

    Keeps the epoch with the best recall@100 on the ranker window (`state`: as of t_history), which
    the two-tower model never trains on, so the validation window stays untouched for reporting."""
    h = ds.history_rows
    rows = h[ds.log_labels[h, 0] > 0]
    users, items = ds.log_user[rows], ds.log_item[rows]
    # positives only: the history strictly before a positive is the earlier positives
    recent = torch.from_numpy(recent_before(users, items, np.ones(rows.size, bool), cfg.recent_len)).long()
    freq = np.bincount(items, minlength=ds.n_items)
    n_uni = cfg.tt_uniform_negatives
    # expected draws of item j per batch under the mixed proposal: B * p_j + U / n_items
    expected = torch.from_numpy((cfg.batch_size * freq / rows.size + n_uni / ds.n_items).astype(np.float32))
    content_t = torch.from_numpy(content)
    cat_t, auth_t = torch.from_numpy(ds.item_category).long(), torch.from_numpy(ds.item_author).long()
    users_t, items_t = torch.from_numpy(users).long(), torch.from_numpy(items).long()
    model = TwoTower(ds.n_users, ds.n_items, ds.n_categories, ds.n_authors, cfg.id_dim, cfg.embed_dim,
                     list(ds.profile_cardinality), list(ds.context_cardinality), content.shape[1])
    drop = cfg.tt_id_dropout
    seen = [np.bincount(x, minlength=n) > 0 for x, n in ((users, ds.n_users), (items, ds.n_items),
                                                           (ds.item_category[items], ds.n_categories),
                                                           (ds.item_author[items], ds.n_authors))]
    has_id = torch.from_numpy(seen[1])

    def loss_fn(b: np.ndarray) -> Tensor:
        u, i = users_t[b], items_t[b]
        cand = torch.cat([i, torch.randint(ds.n_items, (n_uni,))])
        keep = ((torch.rand(cand.numel()) >= drop) & has_id[cand]).float()
        onehots = torch.from_numpy(np.concatenate([one_hot(ds.user_profile[users[b]], ds.profile_cardinality),
                                                   one_hot(ds.log_context[rows[b]], ds.context_cardinality)], 1))
        ue = model.user_tower(model.user_input(u, (torch.rand(b.size) >= drop).float(), onehots, recent[b],
                                                 content_t))
        ve = model.item_tower(model.item_input(cand, keep, cat_t[cand], auth_t[cand], content_t[cand]))
        logits = ue @ ve.T / cfg.tt_temperature - cfg.tt_logq * expected[cand].log()[None, :]
        same = i[:, None] == cand[None, :]                  # the row's item elsewhere is not a negative
        same[:, :b.size] &= ~torch.eye(b.size, dtype=torch.bool)
        return F.cross_entropy(logits.masked_fill(same, -1e9), torch.arange(b.size))

    def torch_fn(tower: nn.Module) -> EmbedFn:
        return lambda x: tower(torch.from_numpy(x)).numpy()

    def evaluate() -> dict[str, float]:
        tabs = model.tables(*seen)
        tables = embed_catalog(serving_tables(ds, content, tabs), tabs, torch_fn(model.item_tower))
        m = two_tower_recall(ds, tables, torch_fn(model.user_tower), state, ds.rank)
        return {"ranker_window_recall@100": m["recall@100"]}

    print(f"two-tower: {rows.size} positive pairs from {ds.n_users} users, {int(seen[1].sum())} items")
    _train_loop(model, rows.size, cfg.tt_epochs, cfg, "two-tower", loss_fn, evaluate,
                select="ranker_window_recall@100")
    return TwoTowerFit(model, model.tables(*seen))


def serving_tables(ds: Dataset, content: np.ndarray, tt_tables: dict[str, np.ndarray],
                   i2i: I2ITable | None = None) -> Tables:
    """The serving Tables; item_emb stays empty until `embed_catalog` fills it."""
    return Tables(np.empty((ds.n_items, 0), np.float32), tt_tables["item_id_emb"], ds.item_category,
                  ds.item_author, content, ds.item_created, tt_tables["user_id_emb"], ds.user_profile,
                  ds.profile_cardinality, ds.context_cardinality, i2i)


def embed_catalog(t: Tables, tt_tables: dict[str, np.ndarray], item_emb: EmbedFn, chunk: int = 65536) -> Tables:
    """Fill t.item_emb with the whole catalog through `item_emb`, in chunks (bounded memory at 1M items)."""
    n = len(t.item_category)
    t.item_emb = np.concatenate([item_emb(item_tower_input(t, tt_tables["category_emb"], tt_tables["author_emb"],
                                                           np.arange(s, min(s + chunk, n))))
                                 for s in bar(range(0, n, chunk), desc="embed catalog", unit="chunk")])
    return t


def two_tower_recall(ds: Dataset, tables: Tables, user_emb: EmbedFn, state: FeatureState, phase: Phase,
                     k: int = 100, n_users: int = 1000, seed: int = 0) -> dict[str, float]:
    """Recall@k of each sampled user's positives in the phase's rows over the whole catalog, queried
    as the server would (`state`: each user's as of their cut, context of the user's first positive
    there), against the most-popular-k (by positives in `state`) and random baselines."""
    v = phase.rows
    rows = v[ds.log_labels[v, 0] > 0]
    all_users, first = np.unique(ds.log_user[rows], return_index=True)
    pick = np.sort(np.random.default_rng(seed).permutation(all_users.size)[:n_users])
    users, ctx_rows = all_users[pick], rows[first[pick]]
    q = user_emb(user_tower_input(tables, users, ds.user_profile[users], ds.log_context[ctx_rows],
                                  state.user_recent[users]))
    top = exact_ids(tables.item_emb, q, k)
    in_sample = np.isin(ds.log_user[rows], users)
    pu, pi = ds.log_user[rows][in_sample], ds.log_item[rows][in_sample]
    pairs = np.unique(pu.astype(np.int64) * ds.n_items + pi)           # distinct (user, item) positives
    pos_user = pairs // ds.n_items
    per_user = np.bincount(np.searchsorted(users, pos_user), minlength=users.size)

    def recall(found: np.ndarray) -> float:
        hit = np.isin(pairs, users[:, None].astype(np.int64) * ds.n_items + found)
        return float(np.mean(np.bincount(np.searchsorted(users, pos_user[hit]), minlength=users.size) / per_user))

    popular = np.argsort(-state.item_n_pos, kind="stable")[:k]
    return {f"recall@{k}": recall(top), f"popular_recall@{k}": recall(np.broadcast_to(popular, top.shape)),
            f"random_recall@{k}": k / ds.n_items, "users": float(users.size)}


# ---------------------------------------------------------------- ranker rows

@dataclass
class RankerRows:
    user: np.ndarray      # [N, Du] ranker_user_input
    item: np.ndarray      # [N, d + F] ranker_item_input (item_e, then the coarse features)
    recent: np.ndarray    # [N, L] for sequence_input, gathered per batch (a [N, L, d] array is too big)
    labels: np.ndarray    # [N, T]
    position: np.ndarray | None = None   # int16 [N] slot the row was shown in; None: not an impression

    @property
    def coarse(self) -> np.ndarray:
        """The cheap features, copied contiguous (LightGBM would copy a strided view anyway)."""
        return np.ascontiguousarray(self.item[:, -len(COARSE_FEATURES):])


def ranker_rows(ds: Dataset, tables: Tables, rows: np.ndarray, state: FeatureState, user_emb: EmbedFn,
                desc: str, chunk: int = 65536) -> RankerRows:
    """Featurize logged impressions with `state` (frozen at the window start), `now` = impression time."""
    n = rows.size
    du = ranker_user_dim(tables.item_emb.shape[1], tables.profile_cardinality, tables.context_cardinality)
    out = RankerRows(np.empty((n, du), np.float32),
                     np.empty((n, tables.item_emb.shape[1] + len(COARSE_FEATURES)), np.float32),
                     state.user_recent[ds.log_user[rows]], ds.log_labels[rows].astype(np.float32),
                     ds.log_position[rows])
    i2i = i2i_pairs(tables.i2i, state.user_recent, ds.log_user[rows], ds.log_item[rows])
    for s in bar(range(0, n, chunk), desc=f"features {desc}", unit="chunk"):
        r = rows[s:s + chunk]
        u, i, ctx, rec = ds.log_user[r], ds.log_item[r], ds.log_context[r], out.recent[s:s + chunk]
        ue = user_emb(user_tower_input(tables, u, ds.user_profile[u], ctx, rec))
        ie = tables.item_emb[i]
        cf = coarse_features(tables, i, ue, ie, rec, state.user_n_imp[u], state.user_n_pos[u],
                             state.item_n_imp[i], state.item_n_pos[i], state.item_hot[i], ctx, ds.log_time[r],
                             i2i[s:s + chunk])
        out.user[s:s + chunk] = ranker_user_input(tables, ue, ds.user_profile[u], ctx)
        out.item[s:s + chunk] = ranker_item_input(ie, cf)
    return out


def candidate_rows(ds: Dataset, tables: Tables, states: UserStates, row: np.ndarray, items: np.ndarray,
                   item_stats: np.ndarray, labels: np.ndarray, chunk: int = 65536) -> RankerRows:
    """Featurize (user at their cut, item) pairs as the serving stages would at the cut: `row`
    indexes `states` (model_export.cascade), `item_stats` [N, 3] are the items' impressions,
    positives and hot score in the user's state, `labels` [N, T]."""
    n = row.size
    du = ranker_user_dim(tables.item_emb.shape[1], tables.profile_cardinality, tables.context_cardinality)
    out = RankerRows(np.empty((n, du), np.float32),
                     np.empty((n, tables.item_emb.shape[1] + len(COARSE_FEATURES)), np.float32),
                     states.recent[row], labels)
    i2i = i2i_pairs(tables.i2i, states.recent, row, items)
    for s in bar(range(0, n, chunk), desc="features candidates", unit="chunk"):
        k, i = row[s:s + chunk], items[s:s + chunk]
        u, ctx, ue, st = states.users[k], states.context[k], states.user_e[k], item_stats[s:s + chunk]
        ie = tables.item_emb[i]
        cf = coarse_features(tables, i, ue, ie, states.recent[k], states.n_imp[k], states.n_pos[k],
                             st[:, 0], st[:, 1], st[:, 2], ctx, states.now[k], i2i[s:s + chunk])
        out.user[s:s + chunk] = ranker_user_input(tables, ue, ds.user_profile[u], ctx)
        out.item[s:s + chunk] = ranker_item_input(ie, cf)
    return out


# ---------------------------------------------------------------- coarse phase 1 (LightGBM)

def fit_gbdt(train: RankerRows, valid: RankerRows, task: str, cfg: TrainConfig,
             soft: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[lgb.Booster, dict[str, float]]:
    """LightGBM on the cheap features for the first task; trees x leaves is a serving latency budget.

    With `soft` (coarse features, soft labels in [0, 1]: distill.Cascade.soft_rows) and a
    `distill_weight`, those rows join the logged ones weighted `distill_weight` (cross-entropy
    objective, the same log loss on 0/1 labels): the trees then learn the fine ranker's view of
    the candidates they cut at serving, not only of logged impressions."""
    soft = soft if cfg.distill_weight > 0 else None
    params = {"objective": "binary" if soft is None else "cross_entropy", "num_leaves": cfg.gbdt_leaves,
              "learning_rate": cfg.gbdt_lr, "num_threads": TRAIN_THREADS, "seed": cfg.seed, "verbose": -1,
              "deterministic": True}
    x, y, w = train.coarse, np.ascontiguousarray(train.labels[:, 0]), None
    if soft is not None:
        x, y = np.concatenate([x, soft[0]]), np.concatenate([y, soft[1]])
        w = np.r_[np.ones(len(train.labels)), np.full(len(soft[1]), cfg.distill_weight)]
    data = lgb.Dataset(x, y, weight=w, feature_name=list(COARSE_FEATURES))
    with bar(total=cfg.gbdt_trees, desc="coarse trees", unit="tree") as trees:
        booster = lgb.train(params, data, num_boost_round=cfg.gbdt_trees, callbacks=[lambda env: trees.update(1)])
    metrics = {f"auc_{task}": auc(valid.labels[:, 0], booster.predict(valid.coarse, num_threads=TRAIN_THREADS))}
    print(f"  coarse trees: {cfg.gbdt_trees} trees x {cfg.gbdt_leaves} leaves, valid auc {metrics[f'auc_{task}']:.4f}")
    return booster, metrics


# ---------------------------------------------------------------- coarse phase 2 and fine ranker

def positions(rows: RankerRows, b: np.ndarray) -> Tensor | None:
    """The slots of rows `b`, for the examination curve (model_export.position); None without."""
    return None if rows.position is None else torch.from_numpy(rows.position[b].astype(np.int64))


def _slots(rows: RankerRows, cfg: TrainConfig) -> int:
    """Slots of the examination curve a ranker trained on `rows` learns: none for rows that are
    not impressions (implicit data, sampled negatives) or with `position_bias = 0`."""
    return cfg.position_bias if rows.position is not None else 0


def _start_exam(model: nn.Module, rows: RankerRows) -> None:
    if model.exam is not None:
        model.exam.start_from(rows.position, rows.labels[:, 0])


def exam_metrics(model: nn.Module) -> dict[str, float]:
    """The learnt examination probability of a few slots against the first (manifest metrics)."""
    curve = model.exam.curve() if model.exam is not None else []
    return {f"exam@{p}": curve[p] for p in EXAM_REPORTED if p < len(curve)}


def _tensors(rows: RankerRows, b: np.ndarray, tables: Tables | None = None) -> list[Tensor]:
    out = [torch.from_numpy(rows.user[b]), torch.from_numpy(rows.item[b])]
    if tables is not None:
        out += [torch.from_numpy(a) for a in sequence_input(tables, rows.recent[b])]
    return out


def predict(model: nn.Module, rows: RankerRows, tables: Tables | None = None, chunk: int = 8192) -> np.ndarray:
    """Model outputs over all rows (training shapes), in chunks; `tables` for the fine ranker's sequence."""
    with torch.no_grad():
        return np.concatenate([model(*_tensors(rows, np.arange(s, min(s + chunk, len(rows.user))), tables)).numpy()
                               for s in range(0, len(rows.user), chunk)])


class AuxLoss(Protocol):
    """A second loss term of the coarse DNN (distill.Listwise) and its own validation metrics."""

    def loss(self) -> Tensor: ...

    def metrics(self) -> dict[str, float]: ...


def fit_coarse_dnn(train: RankerRows, valid: RankerRows, embed_dim: int, task: str, cfg: TrainConfig,
                   aux: Callable[[CoarseDNN], AuxLoss] | None = None) -> tuple[CoarseDNN, dict[str, float]]:
    """The first task's probability from the user row broadcast over candidate rows.

    `aux(model)`: a term added to each batch's loss, e.g. distill.Listwise (a few training
    users' recalled candidates ordered as the fine ranker orders them)."""
    model = CoarseDNN(train.user.shape[1], train.item.shape[1], embed_dim, cfg.dnn_hidden,
                      train.item.mean(0), train.item.std(0), _slots(train, cfg))
    _start_exam(model, train)
    y = torch.from_numpy(train.labels[:, 0])
    extra = aux(model) if aux is not None else None

    def loss_fn(b: np.ndarray) -> Tensor:
        loss = label_loss(model.logits(*_tensors(train, b)), y[b], model.log_exam(positions(train, b))).mean()
        return loss if extra is None else loss + extra.loss()

    def evaluate() -> dict[str, float]:
        out = {f"auc_{task}": auc(valid.labels[:, 0], predict(model, valid)), **exam_metrics(model)}
        return out if extra is None else {**out, **extra.metrics()}

    return model, _train_loop(model, len(train.user), cfg.dnn_epochs, cfg, "coarse dnn", loss_fn, evaluate)


def fit_fine(train: RankerRows, valid: RankerRows, tables: Tables, tasks: tuple[str, ...],
             cfg: TrainConfig) -> tuple[MMoE, dict[str, float]]:
    """Every task at once (summed BCE); one AUC per task."""
    model = MMoE(train.user.shape[1], train.item.shape[1], tables.item_emb.shape[1], len(tasks), cfg.fine_experts,
                 cfg.fine_expert_hidden, cfg.fine_tower_hidden, train.item.mean(0), train.item.std(0),
                 _slots(train, cfg))
    _start_exam(model, train)
    y = torch.from_numpy(train.labels)

    def loss_fn(b: np.ndarray) -> Tensor:
        return label_loss(model.logits(*_tensors(train, b, tables)), y[b],
                          model.log_exam(positions(train, b))).mean(0).sum()

    def evaluate() -> dict[str, float]:
        p = predict(model, valid, tables)
        return {**{f"auc_{t}": auc(valid.labels[:, k], p[:, k]) for k, t in enumerate(tasks)}, **exam_metrics(model)}

    return model, _train_loop(model, len(train.user), cfg.fine_epochs, cfg, "fine mmoe", loss_fn, evaluate)
