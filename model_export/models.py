"""The torch modules behind the bundle's ONNX graphs.

Sparse and dense apart: the exported graphs take dense inputs only. Id embeddings are
nn.Embedding while training and are exported as .npy tables that engine/featurize.py gathers;
`TwoTower.user_input` / `item_input` are the torch twins of `featurize.user_tower_input` /
`item_tower_input` (same concat, same order; tests/test_models.py checks they agree).

The rankers split their first layer into a sum of per-part Linears, so a single user row
(batch 1 at serving) broadcasts over N candidates and its half of the matmul runs once.
Every normalisation constant is a buffer inside the module, so the graph is self-contained.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from engine.core.featurize import user_tower_dim
from model_export.position import Examination

CAT_DIM = AUTHOR_DIM = 16      # category / author embeddings of the item tower
TOWER_HIDDEN = (128,)          # two-tower MLPs: one hidden layer is enough at this scale
ATTN_SCALE0 = 5.0              # initial target-attention sharpness; item embeddings are unit vectors


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear+ReLU between consecutive widths, no activation after the last Linear."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Tower(nn.Module):
    """MLP -> L2-normalised embedding. ONNX: "x" [B, D] -> "emb" [B, d]."""

    onnx_inputs, onnx_outputs = ("x",), ("emb",)

    def __init__(self, d_in: int, embed_dim: int):
        super().__init__()
        self.net = mlp([d_in, *TOWER_HIDDEN, embed_dim])

    def forward(self, x: Tensor) -> Tensor:
        e = self.net(x)
        return e / e.norm(dim=1, keepdim=True).clamp_min(1e-6)


class TwoTower(nn.Module):
    """Id tables + user and item towers. Only the towers are exported; the tables become .npy."""

    def __init__(self, n_users: int, n_items: int, n_categories: int, n_authors: int, id_dim: int,
                 embed_dim: int, profile_cardinality: list[int], context_cardinality: list[int],
                 content_dim: int):
        super().__init__()
        self.kwargs = dict(n_users=n_users, n_items=n_items, n_categories=n_categories, n_authors=n_authors,
                           id_dim=id_dim, embed_dim=embed_dim, profile_cardinality=list(profile_cardinality),
                           context_cardinality=list(context_cardinality), content_dim=content_dim)
        # sparse gradients: a step touches a few thousand of up to 1M rows (SparseAdam in train._train_loop)
        self.user_id, self.item_id = nn.Embedding(n_users, id_dim, sparse=True), nn.Embedding(n_items, id_dim, sparse=True)
        self.category, self.author = nn.Embedding(n_categories, CAT_DIM), nn.Embedding(n_authors, AUTHOR_DIM)
        for e in (self.user_id, self.item_id, self.category, self.author):
            nn.init.normal_(e.weight, std=0.05)
        self.user_tower = Tower(user_tower_dim(id_dim, content_dim, profile_cardinality, context_cardinality),
                                embed_dim)
        self.item_tower = Tower(id_dim + CAT_DIM + AUTHOR_DIM + content_dim, embed_dim)

    def user_input(self, users: Tensor, keep_id: Tensor, onehots: Tensor, recent: Tensor, content: Tensor) -> Tensor:
        """= featurize.user_tower_input: [uid * keep, one_hot(profile), one_hot(context), pooled history ids,
        pooled history content, has_hist]; `content` is the catalog's [I, C] content table."""
        mask = (recent >= 0).float()
        count = mask.sum(1, keepdim=True).clamp_min(1)
        ids = recent.clamp_min(0)
        pooled = (self.item_id(ids) * mask[..., None]).sum(1) / count
        pooled_content = (content[ids] * mask[..., None]).sum(1) / count
        return torch.cat([self.user_id(users) * keep_id[:, None], onehots, pooled, pooled_content, mask[:, :1]], 1)

    def item_input(self, items: Tensor, keep_id: Tensor, category: Tensor, author: Tensor,
                   content: Tensor) -> Tensor:
        """= featurize.item_tower_input, with the id row masked by `keep_id` (id dropout / unseen items)."""
        return torch.cat([self.item_id(items) * keep_id[:, None], self.category(category),
                          self.author(author), content], 1)

    def tables(self, seen_users: np.ndarray, seen_items: np.ndarray, seen_categories: np.ndarray,
               seen_authors: np.ndarray) -> dict[str, np.ndarray]:
        """The sparse side as numpy, rows never trained zeroed (what a new id looks like at serving)."""
        def zeroed(e: nn.Embedding, seen: np.ndarray) -> np.ndarray:
            return (e.weight.detach().numpy() * seen[:, None]).astype(np.float32)
        return {"user_id_emb": zeroed(self.user_id, seen_users), "item_id_emb": zeroed(self.item_id, seen_items),
                "category_emb": zeroed(self.category, seen_categories),
                "author_emb": zeroed(self.author, seen_authors)}


class Standardize(nn.Module):
    """(x - mean) / std with the training statistics frozen into the graph."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        std = np.where(std < 1e-6, 1.0, std)  # constant in training: pass through centred
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class SplitLinear(nn.Module):
    """Linear over concat(parts) written as a sum of one Linear per part, so [1, ·] parts broadcast."""

    def __init__(self, dims: list[int], out: int):
        super().__init__()
        self.parts = nn.ModuleList(nn.Linear(d, out, bias=i == 0) for i, d in enumerate(dims))

    def forward(self, *xs: Tensor) -> Tensor:
        y = self.parts[0](xs[0])
        for lin, x in zip(self.parts[1:], xs[1:]):
            y = y + lin(x)
        return y


class _Ranker(nn.Module):
    """Shared front of both rankers: user [Bu, Du] (user_e first), item [N, Di] (item_e first).

    `item_mean`/`item_std` default to identity: a checkpoint's state_dict restores the real ones.
    `positions` > 0: an examination curve over that many slots (model_export.position), trained
    beside the ranker and never exported: the graph scores relevance alone."""

    def __init__(self, d_item: int, embed_dim: int, item_mean: np.ndarray | None, item_std: np.ndarray | None,
                 positions: int = 0):
        super().__init__()
        self.d = embed_dim
        self.norm = Standardize(np.zeros(d_item) if item_mean is None else item_mean,
                                np.ones(d_item) if item_std is None else item_std)
        self.exam = Examination(positions) if positions > 1 else None

    def log_exam(self, position: Tensor | None) -> Tensor | None:
        """Log examination probability of each row's slot; None when either side lacks positions."""
        return None if self.exam is None or position is None else self.exam.log_prob(position)

    def parts(self, user: Tensor, item: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(user, standardised item, user_e * item_e cross term, item_e)."""
        item_e = item[:, :self.d]
        return user, self.norm(item), user[:, :self.d] * item_e, item_e


class CoarseDNN(_Ranker):
    """Coarse phase 2. ONNX: "user" [Bu, Du], "item" [N, Di] -> "p" [N], probability of the first task."""

    onnx_inputs, onnx_outputs = ("user", "item"), ("p",)

    def __init__(self, d_user: int, d_item: int, embed_dim: int, hidden: list[int],
                 item_mean: np.ndarray | None = None, item_std: np.ndarray | None = None, positions: int = 0):
        super().__init__(d_item, embed_dim, item_mean, item_std, positions)
        self.kwargs = dict(d_user=d_user, d_item=d_item, embed_dim=embed_dim, hidden=list(hidden), positions=positions)
        self.first = SplitLinear([d_user, d_item, embed_dim], hidden[0])
        self.rest = mlp([*hidden, 1])

    def logits(self, user: Tensor, item: Tensor) -> Tensor:
        u, i, x, _ = self.parts(user, item)
        return self.rest(torch.relu(self.first(u, i, x))).squeeze(1)

    def forward(self, user: Tensor, item: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(user, item))


class MMoE(_Ranker):
    """Fine ranker: shared experts, a softmax gate and a tower per task, target attention of the
    candidate over the user's recent items. ONNX: "user" [Bu, Du], "item" [N, Di],
    "seq" [Bs, L, d], "seq_mask" [Bs, L] (Bu, Bs in {1, N}) -> "probs" [N, T]."""

    onnx_inputs, onnx_outputs = ("user", "item", "seq", "seq_mask"), ("probs",)

    def __init__(self, d_user: int, d_item: int, embed_dim: int, n_tasks: int, experts: int,
                 expert_hidden: list[int], tower_hidden: list[int], item_mean: np.ndarray | None = None,
                 item_std: np.ndarray | None = None, positions: int = 0):
        super().__init__(d_item, embed_dim, item_mean, item_std, positions)
        self.kwargs = dict(d_user=d_user, d_item=d_item, embed_dim=embed_dim, n_tasks=n_tasks, experts=experts,
                           expert_hidden=list(expert_hidden), tower_hidden=list(tower_hidden), positions=positions)
        self.n_experts, self.n_tasks, self.h0 = experts, n_tasks, expert_hidden[0]
        parts = [d_user, d_item, embed_dim, embed_dim]        # user, item, cross, attention-pooled seq
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(ATTN_SCALE0))))
        self.expert_in = SplitLinear(parts, experts * expert_hidden[0])   # all experts' first layers at once
        self.expert_w = nn.ParameterList()
        self.expert_b = nn.ParameterList()
        for a, b in zip(expert_hidden[:-1], expert_hidden[1:]):
            self.expert_w.append(nn.Parameter(torch.randn(experts, a, b) * (2 / a) ** 0.5))
            self.expert_b.append(nn.Parameter(torch.zeros(experts, 1, b)))
        self.gate = SplitLinear(parts, n_tasks * experts)
        self.towers = nn.ModuleList(mlp([expert_hidden[-1], *tower_hidden, 1]) for _ in range(n_tasks))

    def attend(self, item_e: Tensor, seq: Tensor, seq_mask: Tensor) -> Tensor:
        """Masked softmax of item_e . seq_l over l, pooled [N, d]; an empty history pools to zeros."""
        scores = (seq * item_e[:, None, :]).sum(-1) * self.log_scale.exp()     # [N, L] by broadcasting
        w = torch.softmax(scores + (seq_mask - 1.0) * 1e4, dim=-1) * seq_mask
        return (w[..., None] * seq).sum(1)

    def logits(self, user: Tensor, item: Tensor, seq: Tensor, seq_mask: Tensor) -> Tensor:
        u, i, x, item_e = self.parts(user, item)
        p = self.attend(item_e, seq, seq_mask)
        h = torch.relu(self.expert_in(u, i, x, p)).reshape(-1, self.n_experts, self.h0).transpose(0, 1)  # [E, N, h]
        for w, b in zip(self.expert_w, self.expert_b):
            h = torch.relu(torch.matmul(h, w) + b)
        gates = torch.softmax(self.gate(u, i, x, p).reshape(-1, self.n_tasks, self.n_experts), dim=-1)
        mixed = torch.matmul(gates, h.transpose(0, 1))                         # [N, T, h]
        return torch.cat([tower(mixed[:, t]) for t, tower in enumerate(self.towers)], 1)

    def forward(self, user: Tensor, item: Tensor, seq: Tensor, seq_mask: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(user, item, seq, seq_mask))


CHECKPOINTED = {"two_tower": TwoTower, "coarse_dnn": CoarseDNN, "fine": MMoE}


def save_checkpoints(models: dict[str, nn.Module], directory: Path) -> None:
    """state_dicts (torch.load(weights_only=True)-safe) plus models.json with constructor kwargs."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, m in models.items():
        torch.save(m.state_dict(), directory / f"{name}.pt")
    (directory / "models.json").write_text(json.dumps({n: m.kwargs for n, m in models.items()}, indent=1))


def load_checkpoints(directory: Path) -> dict[str, nn.Module]:
    """The trained torch models of a build, in eval mode (e.g. for an eager-torch baseline)."""
    spec: dict[str, dict[str, Any]] = json.loads((directory / "models.json").read_text())
    out = {}
    for name, kwargs in spec.items():
        m = CHECKPOINTED[name](**kwargs)
        m.load_state_dict(torch.load(directory / f"{name}.pt", weights_only=True))
        out[name] = m.eval()
    return out
