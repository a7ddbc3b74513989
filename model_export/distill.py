"""Cascade samples: the fine ranker's opinion of what recall returns, as training data for the coarse stages.

The coarse stages train on logged impressions but serve on recalled candidates, and there
their job is to keep what the fine ranker would put on top. Distillation closes that gap:
for training users (rank-part users, each at their cut) the config's own recall routes and
filters run offline (model_export.cascade, the code the server runs); the candidates are
featurized as the stages featurize them, the fine ranker scores every one and the rerank's
fusion turns its task probabilities into one value. Each user keeps the teacher's best
candidates and a random draw of the rest; the coarse DNN then learns to order them as the
teacher does (`Listwise`: a listwise loss beside its own BCE on the logged labels), and the
trees learn the teacher's first-task probability as a soft label (`Cascade.soft_rows`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.core.config import Config

from engine.core.sections import TrainConfig
from engine.core.featurize import COARSE_FEATURES, Tables, ranker_user_dim
from indexes import AnnIndex
from model_export import cascade
from model_export.dataset import Dataset, Phase
from model_export.models import MMoE, CoarseDNN
from model_export.progress import bar
from model_export.train import EmbedFn, candidate_rows, predict

TOP = 32            # teacher's best candidates kept per user
OTHERS = 96         # further candidates per user, drawn uniformly from the rest of the recall
CHUNK_USERS = 64    # users featurized and scored at once (their candidates' rows held in memory)

Fusion = Callable[[np.ndarray], np.ndarray]   # task probabilities [N, T] -> fused value [N]


@dataclass
class Cascade:
    """G = TOP + OTHERS candidate rows per user, grouped: rows k*G .. (k+1)*G - 1 are user k's."""

    users: np.ndarray     # int64 [U] the dataset's user indices
    user: np.ndarray      # [U, Du] ranker_user_input per user
    item: np.ndarray      # [U * G, Di] ranker_item_input per candidate
    teacher: np.ndarray   # float32 [U, G] log of the teacher's fused value
    probs: np.ndarray     # float32 [U, G, T] the teacher's task probabilities

    @property
    def group(self) -> int:
        return self.teacher.shape[1]

    def soft_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The candidates' coarse features and the teacher's first-task probability (the trees' soft labels)."""
        return self.item[:, -len(COARSE_FEATURES):], self.probs[:, :, 0].ravel()


def cascade_samples(ds: Dataset, cfg: Config, tables: Tables, schema: dict, user_emb: EmbedFn, phase: Phase,
                    teacher: MMoE, fusion: Fusion, n_users: int, rng: np.random.Generator,
                    index: AnnIndex | None = None) -> Cascade:
    """Score the offline recall of up to `n_users` users of `phase` with the teacher.

    `tables` are the ones the phase's ranker rows read (their i2i table built without the
    phase's rows); users whose recall holds no more than TOP candidates are left out."""
    users = np.sort(rng.permutation(phase.users)[:n_users])
    rec, states = cascade.recall(ds, cfg, tables, schema, user_emb, phase, users, index=index)
    bounds = np.searchsorted(rec.row, np.arange(states.users.size + 1))
    ok = np.flatnonzero(np.diff(bounds) > TOP)
    g, n_tasks = TOP + OTHERS, teacher.n_tasks
    du = ranker_user_dim(tables.item_emb.shape[1], tables.profile_cardinality, tables.context_cardinality)
    user_x = np.empty((ok.size, du), np.float32)
    item_x = np.empty((ok.size, g, tables.item_emb.shape[1] + len(COARSE_FEATURES)), np.float32)
    teach = np.empty((ok.size, g), np.float32)
    probs_out = np.empty((ok.size, g, n_tasks), np.float32)
    teacher = teacher.eval()
    for s in bar(range(0, ok.size, CHUNK_USERS), desc="cascade samples", unit="chunk"):
        ks = ok[s:s + CHUNK_USERS]
        at = np.concatenate([np.arange(bounds[k], bounds[k + 1]) for k in ks])
        rows = candidate_rows(ds, tables, states, rec.row[at], rec.item[at], rec.item_stats[at],
                              np.zeros((at.size, n_tasks), np.float32))
        probs = predict(teacher, rows, tables)
        value = np.log(np.maximum(fusion(probs), 1e-12)).astype(np.float32)
        lo = 0
        for j, k in enumerate(ks, start=s):
            n = bounds[k + 1] - bounds[k]
            order = np.argsort(-value[lo:lo + n], kind="stable")
            rest = order[TOP:]
            keep = lo + np.concatenate([order[:TOP], rng.choice(rest, OTHERS, replace=rest.size < OTHERS)])
            user_x[j], item_x[j], teach[j], probs_out[j] = rows.user[lo], rows.item[keep], value[keep], probs[keep]
            lo += n
    return Cascade(states.users[ok], user_x, item_x.reshape(-1, item_x.shape[2]), teach, probs_out)


def listwise_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Cross-entropy of the student's softmax over each user's candidates [B, G] against the
    teacher's (softmax of log fused value: each candidate's share of the list's total value)."""
    return -(torch.softmax(teacher, 1) * F.log_softmax(student, 1)).sum(1).mean()


class Listwise:
    """The listwise half of the coarse DNN's loss over cascade users (train.AuxLoss), and its
    held-out agreement: a tenth of the users is kept out of the loss for it."""

    def __init__(self, model: CoarseDNN, c: Cascade, n_rows: int, cfg: TrainConfig):
        self.model, self.c, self.weight = model, c, cfg.distill_weight
        self.rng = np.random.default_rng(cfg.seed + 1)
        users = self.rng.permutation(len(c.user))
        self.held, self.train = np.sort(users[:len(users) // 10]), np.sort(users[len(users) // 10:])
        # users per batch: one epoch over the logged rows passes over the cascade users once
        self.per_batch = max(1, round(self.train.size * cfg.batch_size / n_rows))
        self.user, self.item = torch.from_numpy(c.user), torch.from_numpy(c.item)
        self.teacher = torch.from_numpy(c.teacher)
        self.cols = torch.arange(c.group)

    def _logits(self, users: np.ndarray) -> Tensor:
        u = torch.from_numpy(users)
        rows = (u[:, None] * self.c.group + self.cols).reshape(-1)
        return self.model.logits(self.user[u].repeat_interleave(self.c.group, 0), self.item[rows]).view(-1, self.c.group)

    def loss(self) -> Tensor:
        """`distill_weight` x the listwise loss of a few training users (zero when the weight is 0)."""
        if self.weight == 0 or self.train.size == 0:
            return torch.zeros(())
        users = self.rng.choice(self.train, self.per_batch)
        return self.weight * listwise_loss(self._logits(users), self.teacher[torch.from_numpy(users)])

    def metrics(self, top: int = 10, within: int = 10) -> dict[str, float]:
        """Share of the teacher's top `top` among the student's top `within` of the held-out users' candidates."""
        with torch.no_grad():
            s = self._logits(self.held).numpy()
        st = np.argsort(-s, 1)[:, :within]
        tt = np.argsort(-self.c.teacher[self.held], 1)[:, :top]
        return {f"teacher_top{top}_in_top{within}": float(np.mean([np.isin(a, b).mean() for a, b in zip(tt, st)]))}
