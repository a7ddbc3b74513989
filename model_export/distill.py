"""Cascade samples: the fine ranker's opinion of what recall returns, as training data for the coarse stages.

The coarse stages train on logged impressions but serve on recalled candidates, and there
their job is to keep what the fine ranker would put on top. Distillation closes that gap:
for training users (rank-window users, feature state as of its start, the context and time of
their first row there) the recall of the served funnel runs offline (the two-tower's top-k,
as the ann route finds them, plus the hottest items, minus what the user has seen); the fine
ranker scores every candidate and the rerank's fusion turns its task probabilities into one
value. Each user keeps the teacher's best candidates and a random draw of the rest; the
coarse DNN then learns to order them as the teacher does (a listwise loss beside its own
BCE on the logged labels), and the trees learn the teacher's value as a soft label.

`offline_recall` is a minimal stand-in for model_export.cascade (the config's own routes and
filters over a walked state) until that lands: same inputs, candidates per user.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.core.featurize import (COARSE_FEATURES, Tables, coarse_features, ranker_item_input, ranker_user_input, sequence_input,
                                   user_tower_input)
from engine.core.state import FeatureState
from indexes import exact_ids
from model_export.dataset import Dataset
from model_export.models import MMoE
from model_export.progress import bar

TOP = 32            # teacher's best candidates kept per user
OTHERS = 96         # further candidates per user, drawn uniformly from the rest of the recall
HOT = 200           # hottest items added to each user's recall

Fusion = Callable[[np.ndarray], np.ndarray]   # task probabilities [N, T] -> fused value [N]


@dataclass
class Cascade:
    """G = TOP + OTHERS candidate rows per user, grouped: rows k*G .. (k+1)*G - 1 are user k's."""

    user: np.ndarray      # [U, Du] ranker_user_input per user
    item: np.ndarray      # [U * G, Di] ranker_item_input per candidate
    teacher: np.ndarray   # float32 [U, G] log of the teacher's fused value
    probs: np.ndarray     # float32 [U, G, T] the teacher's task probabilities

    @property
    def group(self) -> int:
        return self.teacher.shape[1]


def offline_recall(tables: Tables, state: FeatureState, user_e: np.ndarray, users: np.ndarray,
                   k: int) -> list[np.ndarray]:
    """Each user's candidates: the two-tower's exact top-k and the hottest items, without
    repeats and without what the user has seen (the seen filter)."""
    top = exact_ids(tables.item_emb, user_e, min(k, len(tables.item_emb)))
    hot = np.argsort(-state.item_hot, kind="stable")[:HOT]
    seen = state.user_seen[users]
    return [np.setdiff1d(np.union1d(t, hot), s[s >= 0]) for t, s in zip(top, seen)]


def cascade_samples(ds: Dataset, tables: Tables, rank_rows: np.ndarray, state: FeatureState,
                    user_emb: Callable[[np.ndarray], np.ndarray], teacher: MMoE, fusion: Fusion, n_users: int,
                    k: int, rng: np.random.Generator) -> Cascade:
    """Score the offline recall of up to `n_users` rank-window users with the teacher."""
    users, first = np.unique(ds.log_user[rank_rows], return_index=True)
    pick = np.sort(rng.permutation(users.size)[:n_users])
    users, first = users[pick], rank_rows[first[pick]]
    ctx, now = ds.log_context[first], ds.log_time[first]
    recent = state.user_recent[users]
    user_e = user_emb(user_tower_input(tables, users, ds.user_profile[users], ctx, recent))
    user_x = ranker_user_input(tables, user_e, ds.user_profile[users], ctx)
    cand = offline_recall(tables, state, user_e, users, k)
    g = TOP + OTHERS
    teach = np.empty((users.size, g), np.float32)
    probs_out = np.empty((users.size, g, teacher.n_tasks), np.float32)
    item_x = np.empty((users.size, g, tables.item_emb.shape[1] + len(COARSE_FEATURES)), np.float32)
    for j in bar(range(users.size), desc="cascade samples", unit="user"):
        c = cand[j]
        x = _item_rows(tables, state, c, users[j], user_e[j:j + 1], recent[j:j + 1], ctx[j:j + 1], now[j])
        seq, mask = (torch.from_numpy(a) for a in sequence_input(tables, recent[j:j + 1]))
        with torch.no_grad():
            probs = teacher(torch.from_numpy(user_x[j:j + 1]), torch.from_numpy(x), seq, mask).numpy()
        value = np.log(np.maximum(fusion(probs), 1e-12))
        order = np.argsort(-value, kind="stable")
        rest = order[TOP:]
        keep = np.concatenate([order[:TOP], rng.choice(rest, g - TOP, replace=rest.size < g - TOP)])
        teach[j], item_x[j], probs_out[j] = value[keep], x[keep], probs[keep]
    return Cascade(user_x, item_x.reshape(-1, item_x.shape[2]), teach, probs_out)


def listwise_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Cross-entropy of the student's softmax over each user's candidates [B, G] against the
    teacher's (softmax of log fused value: each candidate's share of the list's total value)."""
    return -(torch.softmax(teacher, 1) * F.log_softmax(student, 1)).sum(1).mean()


def _item_rows(tables: Tables, state: FeatureState, items: np.ndarray, user: int, user_e: np.ndarray,
               recent: np.ndarray, ctx: np.ndarray, now: float) -> np.ndarray:
    """ranker_item_input for one user's candidates, as the rank_trees stage builds them."""
    item_e = tables.item_emb[items]
    f = coarse_features(tables, items, user_e, item_e, recent, state.user_n_imp[user], state.user_n_pos[user],
                        state.item_n_imp[items], state.item_n_pos[items], state.item_hot[items], ctx, now)
    return ranker_item_input(item_e, f)
