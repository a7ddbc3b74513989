"""Ranker rows for data without impressions: "will the user interact", learned at the user's cut.

A log of interactions only (MovieLens ratings, a user's own files) has no negatives: every row
is a positive of the first task. The rows here are what serving would rank at each user's cut
(model_export.cascade: the config's own recall routes and filters, on the state before the
cut), labelled by the part of the log after it: the first task (interacted) and the others
(e.g. like = rated >= 4) from the user's rows in the phase. `ImplicitConfig` mixes in
sampled negatives: uniform and popularity-weighted items the user never interacted with.

On MovieLens the recalled candidates alone are the best negatives (docs/quality.md):
training on the distribution the ranker serves beats every sampling scheme tried, and
popularity-weighted negatives teach the model to penalise popularity, which is the signal
the held-out metric rewards.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core.config import Config
from engine.core.featurize import Tables
from indexes import AnnIndex
from model_export import cascade
from model_export.dataset import Dataset, Phase
from model_export.train import EmbedFn, RankerRows, candidate_rows

POP_EXPONENT = 0.75         # popular negatives: drawn with probability ~ (interactions + 1) ** 0.75


@dataclass
class ImplicitRows:
    rows: RankerRows
    stats: dict[str, float]     # what the build prints and the manifest records


def _labels(ds: Dataset, phase: Phase) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys user * n_items + item of the phase's interactions, and their labels [K, T]
    (max over repeats; on MovieLens the first task, "click", is 1 for every interaction)."""
    rows = phase.rows
    keys = ds.log_user[rows].astype(np.int64) * ds.n_items + ds.log_item[rows]
    uniq, inv = np.unique(keys, return_inverse=True)
    labels = np.zeros((uniq.size, len(ds.tasks)), np.float32)
    np.maximum.at(labels, inv, ds.log_labels[rows].astype(np.float32))
    return uniq, labels


def implicit_rows(ds: Dataset, cfg: Config, tables: Tables, schema: dict, user_emb: EmbedFn, phase: Phase,
                  rng: np.random.Generator, index: AnnIndex | None = None) -> ImplicitRows:
    """Rows of `phase`'s users: their recalled candidates at the cut (all positives, a
    `candidates` share of the rest), the interactions recall missed when `positives = "all"`,
    and `uniform` / `popular` sampled items per positive; features as the stages compute them.
    With `train.max_rank_rows` set, a sample of users whose candidates (at most the routes' k
    summed, each) fit in it."""
    ic = cfg.implicit
    users = phase.users
    per_user = sum(cfg.stage[name][1].k for name in cfg.pipeline.recall)
    if cfg.train.max_rank_rows > 0 and users.size * per_user > cfg.train.max_rank_rows:
        users = np.sort(rng.choice(users, max(cfg.train.max_rank_rows // per_user, 1), replace=False))
    keys, labels = _labels(ds, phase)
    n_items = ds.n_items
    extra: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []    # (state row, item, item stats)

    def sample(group: cascade.Group, states: cascade.UserStates, rows: np.ndarray) -> None:
        """Per user of the group: missed positives and sampled negatives, with item stats at its cut."""
        store = group.store
        pop = (store.item_n_imp.astype(np.float64) + 1.0) ** POP_EXPONENT
        pop /= pop.sum()
        for k in rows:
            u = int(states.users[k])
            lo, hi = np.searchsorted(keys, [u * n_items, (u + 1) * n_items])
            pos = (keys[lo:hi] - u * n_items).astype(np.int32)
            seen = store.users["user_seen"][u]
            taken = np.union1d(pos, np.concatenate([seen[seen >= 0], states.recent[k][states.recent[k] >= 0]]))
            items = [pos] if ic.positives == "all" else []
            for n, p in ((int(np.rint(ic.uniform * pos.size)), None), (int(np.rint(ic.popular * pos.size)), pop)):
                if n:
                    draw = rng.choice(n_items, n, p=p)
                    items.append(draw[~np.isin(draw, taken)])
            if items:
                it = np.unique(np.concatenate(items)).astype(np.int32)
                extra.append((np.full(it.size, k, np.int64), it, np.stack(store.item_stats(it), axis=1)))

    rec, states = cascade.recall(ds, cfg, tables, schema, user_emb, phase, users, index=index, on_group=sample)
    cand_keys = states.users[rec.row] * n_items + rec.item
    hit = np.isin(cand_keys, keys)
    keep = hit | (rng.random(hit.size) < ic.candidates)
    row, item, stats = rec.row[keep], rec.item[keep], rec.item_stats[keep]
    if extra:
        xr, xi, xs = (np.concatenate(a) for a in zip(*extra))
        new = ~np.isin(states.users[xr] * n_items + xi, cand_keys)      # not already a candidate row
        row, item, stats = np.r_[row, xr[new]], np.r_[item, xi[new]], np.r_[stats, xs[new]]
    order = np.argsort(row, kind="stable")
    row, item, stats = row[order], item[order], stats[order]
    q = states.users[row] * n_items + item
    at = np.minimum(np.searchsorted(keys, q), max(keys.size - 1, 0))
    found = keys.size > 0
    y = np.where(((keys[at] == q) if found else np.zeros(q.size, bool))[:, None], labels[at], 0.0)
    n_pos_window = np.bincount(keys // n_items, minlength=ds.n_users)[states.users]
    recalled_pos = np.bincount(rec.row[hit], minlength=states.users.size)
    out = candidate_rows(ds, tables, states, row, item, stats, y.astype(np.float32))
    stats_out = {"users": float(states.users.size), "rows": float(row.size),
                 "candidates_per_user": float(rec.row.size / max(states.users.size, 1)),
                 "candidate_recall": float(np.mean(recalled_pos / np.maximum(n_pos_window, 1))),
                 **{f"rate_{t}": float(y[:, k].mean()) for k, t in enumerate(ds.tasks)}}
    return ImplicitRows(out, stats_out)
