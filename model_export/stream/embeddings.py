"""The sparse half of a streaming update: rows of the two-tower id tables refreshed from the
positives in joined samples, the towers frozen (ByteDance's Monolith pushes changed embedding
rows; here a version carries them).

A user whose interests moved, or an item nobody had interacted with, is a row of
`user_id_emb` / `item_id_emb`: the dense rankers cannot learn either, since their inputs are
that row's output (the user and item embeddings). The rows are trained with the build's own
objective (in-batch sampled softmax with logQ correction, model_export.train.fit_two_tower),
starting from the serving tables, with sparse Adam at the build's learning rate by default: its
step does not shrink with a row's history, as Adagrad's does (`stream.emb_optimizer`), so a
user whose interests move after hours of traffic is followed as fast as a new one (see
docs/loop.md, "What the trainer updates, and why").
Because the towers are frozen, no graph is re-exported: a version writes the two id tables,
the item embeddings of the items whose row changed (through the serving item-tower graph, as
the build embeds the catalog) and the index updated for them.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.core.bundle import Bundle
from engine.core.sections import StreamConfig
from engine.core.featurize import Tables, item_tower_input, pooled
from indexes.faiss_index import FaissIndex
from model_export.bundle_writer import BundleWriter
from model_export.export import ort_session
from model_export.models import TwoTower
from model_export.stream.samples import Samples

STATE = "id_embeddings.pt"      # optimiser state and positive counts, beside the checkpoints
OPTIMIZERS = {"adam": torch.optim.SparseAdam, "adagrad": torch.optim.Adagrad}
HOLDOUT_PAIRS = 2000           # held-out clicks the gate scores against each other
WRITTEN = ("tables/user_id_emb.npy", "tables/item_id_emb.npy", "tables/item_emb.npy", "index/items.faiss")


class EmbeddingLearner:
    """user_id / item_id rows of the two-tower model, trained one chunk at a time."""

    def __init__(self, checkpoints: Path, loaded: dict[str, nn.Module], bundle: Bundle, cfg: StreamConfig,
                 temperature: float):
        """`loaded`: the modules models.load_checkpoints(checkpoints) returned, read once per start for
        every learner; `checkpoints` still holds the optimiser state."""
        self.cfg, self.temperature = cfg, temperature
        tt: TwoTower = loaded["two_tower"]
        self.item_tower = ort_session(bundle.file("models/item_tower.onnx"))   # frozen: one session for every write
        t = bundle.tables
        # the serving tables, not the checkpoint's raw weights: rows never trained serve as zeros
        tt.user_id = nn.Embedding.from_pretrained(torch.tensor(np.asarray(t.user_id_emb)), freeze=False, sparse=True)
        tt.item_id = nn.Embedding.from_pretrained(torch.tensor(np.asarray(t.item_id_emb)), freeze=False, sparse=True)
        for name, rel in (("category", "category_emb"), ("author", "author_emb")):
            table = np.load(bundle.file(f"tables/{rel}.npy"), allow_pickle=False)
            setattr(tt, name, nn.Embedding.from_pretrained(torch.tensor(table), freeze=True))
        for p in (*tt.user_tower.parameters(), *tt.item_tower.parameters()):
            p.requires_grad_(False)
        self.tt = tt.eval()
        self.opt = OPTIMIZERS[cfg.emb_optimizer]([tt.user_id.weight, tt.item_id.weight], lr=cfg.emb_lr)
        torch.sparse.check_sparse_tensor_invariants.disable()   # the optimiser's own sparse updates: skip the checks
        self.item_pos = np.asarray(bundle.state.item_n_pos, np.float64).copy()   # logQ: positives per item so far
        saved = checkpoints / STATE
        if saved.is_file():
            state = torch.load(saved, weights_only=True)
            if state.get("optimizer", "adagrad") == cfg.emb_optimizer:    # else: a fresh one, same rows
                self.opt.load_state_dict(state["opt"])
                for g in self.opt.param_groups:
                    g["lr"] = cfg.emb_lr
            self.item_pos = state["item_pos"].numpy().astype(np.float64)
        self.category = torch.tensor(np.asarray(t.item_category), dtype=torch.long)
        self.author = torch.tensor(np.asarray(t.item_author), dtype=torch.long)
        self.content = torch.tensor(np.asarray(t.item_content))
        self.embed_dim = int(bundle.manifest["schema"]["embed_dim"])
        self.touched_users = np.zeros(t.user_id_emb.shape[0], bool)
        self.touched_items = np.zeros(t.item_id_emb.shape[0], bool)

    def train(self, s: Samples, rng: np.random.Generator) -> dict[str, float]:
        """One pass of the two-tower objective over the primary-task positives of known users."""
        pos = np.flatnonzero((s.rows.labels[:, 0] > 0) & (s.user_index >= 0))
        np.add.at(self.item_pos, s.item_index[pos], 1.0)
        if pos.size < 2:
            return {"id_embeddings": 0.0}
        log_q = np.log(self.item_pos / self.item_pos.sum() + 1e-12).astype(np.float32)
        perm = rng.permutation(pos)
        total = 0.0
        for k in range(0, perm.size, self.cfg.batch_size):
            b = perm[k:k + self.cfg.batch_size]
            if b.size < 2:
                continue
            total += self._step(s, b, torch.from_numpy(log_q)) * b.size
        self.mark(s, pos)
        return {"id_embeddings": total / pos.size}

    def embed(self, s: Samples, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """User and item embeddings of rows `b` from the current id rows (gradients reach them)."""
        u = torch.from_numpy(s.user_index[b]).long()
        i = torch.from_numpy(s.item_index[b]).long()
        onehots = torch.from_numpy(s.rows.user[b, self.embed_dim:])      # user_x = [user_e, profile, context]
        ue = self.tt.user_tower(self.tt.user_input(u.clamp_min(0), (u >= 0).float(), onehots,
                                                   torch.from_numpy(s.rows.recent[b]).long(), self.content))
        ve = self.tt.item_tower(self.tt.item_input(i, torch.ones(b.size), self.category[i], self.author[i],
                                                   self.content[i]))
        return ue, ve

    def splice(self, s: Samples, b: np.ndarray, user: torch.Tensor, item: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rankers' logged inputs with the embeddings (and the two-tower score, the first
        cheap feature) recomputed from the current id rows."""
        d = self.embed_dim
        ue, ve = self.embed(s, b)
        tt = (ue * ve).sum(1, keepdim=True)
        return torch.cat([ue, user[:, d:]], 1), torch.cat([ve, tt, item[:, d + 1:]], 1)

    def mark(self, s: Samples, rows: np.ndarray) -> None:
        """Rows whose id embeddings got gradients: the users and items of `rows`, and the items of
        their histories (pooled into the user tower)."""
        known = rows[s.user_index[rows] >= 0]
        self.touched_users[s.user_index[known]] = True
        self.touched_items[s.item_index[rows]] = True
        rec = s.rows.recent[known]
        self.touched_items[rec[rec >= 0]] = True

    def _step(self, s: Samples, b: np.ndarray, log_q: torch.Tensor) -> float:
        ue, ve = self.embed(s, b)
        i = torch.from_numpy(s.item_index[b]).long()
        logits = ue @ ve.T / self.temperature - log_q[i][None, :]
        same = (i[None, :] == i[:, None]) & ~torch.eye(b.size, dtype=torch.bool)   # a repeat is not a negative
        loss = F.cross_entropy(logits.masked_fill(same, -1e9), torch.arange(b.size))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.item())

    def snapshot(self) -> dict:
        return {"two_tower": copy.deepcopy({"user": self.tt.user_id.weight.detach(), "item": self.tt.item_id.weight.detach(),
                                            "opt": self.opt.state_dict(), "item_pos": self.item_pos,
                                            "touched": (self.touched_users, self.touched_items)})}

    def restore(self, snap: dict, names: set[str] | None = None) -> None:
        if names is not None and "two_tower" not in names:
            return
        snap = snap["two_tower"]
        with torch.no_grad():
            self.tt.user_id.weight.copy_(snap["user"])
            self.tt.item_id.weight.copy_(snap["item"])
        self.opt.load_state_dict(snap["opt"])
        self.item_pos = snap["item_pos"].copy()
        self.touched_users, self.touched_items = (a.copy() for a in snap["touched"])

    def write(self, w: BundleWriter, parent: Path, bundle: Bundle) -> tuple[np.ndarray, dict[str, int]]:
        """The new tables, item embeddings and index into the version being written; returns the
        new item embeddings (the fine ranker's sequence input in this version)."""
        user_emb = self.tt.user_id.weight.detach().numpy()
        item_id_emb = self.tt.item_id.weight.detach().numpy()
        changed = np.flatnonzero(self.touched_items)
        item_emb = np.array(np.load(parent / "tables/item_emb.npy", mmap_mode="r"), copy=True)
        if changed.size:
            t = bundle.tables
            tables = copy.copy(t)
            tables.item_id_emb = item_id_emb
            sess = self.item_tower
            cat = self.tt.category.weight.numpy()
            auth = self.tt.author.weight.numpy()
            for k in range(0, changed.size, 65536):
                rows = changed[k:k + 65536]
                item_emb[rows] = sess.run(None, {"x": item_tower_input(tables, cat, auth, rows)})[0]
        w.array("tables/user_id_emb.npy", user_emb)
        w.array("tables/item_id_emb.npy", item_id_emb)
        w.array("tables/item_emb.npy", item_emb)
        _update_index(parent / "index/items.faiss", item_emb, changed).save(w.path("index/items.faiss"))
        counts = {"users": int(self.touched_users.sum()), "items": int(changed.size)}
        return item_emb, counts

    def evaluate(self, s: Samples, item_emb: np.ndarray, serving: Tables, task: str
                 ) -> dict[str, dict[str, dict[str, float]]]:
        """The two-tower's held-out AUC, candidate rows against the serving tables: for each
        held-out click of a known user, the share of the other clicked items of the holdout that
        user's embedding scores below the clicked one (ties half), averaged."""
        pos = np.flatnonzero((s.rows.labels[:, 0] > 0) & (s.user_index >= 0))[:HOLDOUT_PAIRS]
        items = s.item_index[pos]
        cand = (self.tt.user_id.weight.detach().numpy(), self.tt.item_id.weight.detach().numpy(), item_emb)
        serv = (np.asarray(serving.user_id_emb), np.asarray(serving.item_id_emb), np.asarray(serving.item_emb))
        out = {}
        for side, (user_id_emb, item_id_emb, emb) in (("candidate", cand), ("serving", serv)):
            ue = self._user_emb(s, pos, user_id_emb, item_id_emb)
            score = ue @ np.asarray(emb[items]).T                                   # [P, P], the click on the diagonal
            other = items[None, :] != items[:, None]
            mine = np.diag(score)[:, None]
            below = ((score < mine) + 0.5 * (score == mine)) * other
            out[side] = {task: float(np.mean(below.sum(1) / np.maximum(other.sum(1), 1))) if pos.size > 1
                         else float("nan")}
        return {"two_tower": out}

    def as_served(self, s: Samples, item_emb: np.ndarray) -> Samples:
        """The rows with the inputs a version carrying these id rows would serve: user and item
        embeddings (and their two-tower score) recomputed, the rest as logged."""
        d = self.embed_dim
        ue = self._user_emb(s, np.arange(len(s)), self.tt.user_id.weight.detach().numpy(),
                            self.tt.item_id.weight.detach().numpy())
        ie = np.asarray(item_emb[s.item_index], np.float32)
        user, item = s.rows.user.copy(), s.rows.item.copy()
        user[:, :d], item[:, :d] = ue, ie
        item[:, d] = np.einsum("nd,nd->n", ue, ie)
        return dataclasses.replace(s, rows=dataclasses.replace(s.rows, user=user, item=item))

    def _user_emb(self, s: Samples, rows: np.ndarray, user_id_emb: np.ndarray, item_id_emb: np.ndarray) -> np.ndarray:
        """The frozen user tower over the given id tables for the logged rows (their profile and
        context one-hots are the logged user row's tail: featurize.ranker_user_input)."""
        recent = s.rows.recent[rows]
        users = s.user_index[rows]
        uid = np.where((users >= 0)[:, None], user_id_emb[np.maximum(users, 0)], 0.0)   # new users: zeros, as served
        x = np.concatenate([uid, s.rows.user[rows, self.embed_dim:],
                            pooled(item_id_emb, recent), pooled(self.content.numpy(), recent),
                            (recent[:, :1] >= 0).astype(np.float32)], 1)
        with torch.no_grad():
            return self.tt.user_tower(torch.from_numpy(x.astype(np.float32))).numpy()

    def published(self) -> None:
        """The rows written are now the serving ones: the next version lists what changes after."""
        self.touched_users[:] = False
        self.touched_items[:] = False

    def save(self, out: Path) -> None:
        """The two-tower checkpoint with the refreshed id rows, and the optimiser state."""
        state = {k: v for k, v in self.tt.state_dict().items()}
        torch.save(state, out / "two_tower.pt")
        torch.save({"opt": self.opt.state_dict(), "optimizer": self.cfg.emb_optimizer,
                    "item_pos": torch.from_numpy(self.item_pos)}, out / STATE)


def _update_index(path: Path, item_emb: np.ndarray, changed: np.ndarray) -> FaissIndex:
    """The parent's index with the changed items' vectors replaced (an IVF keeps its trained
    lists; a flat index is rebuilt, its ids being positions)."""
    index = faiss.read_index(str(path))
    emb = np.ascontiguousarray(item_emb, dtype=np.float32)
    if isinstance(index, faiss.IndexFlat):
        index.reset()
        index.add(emb)
    elif changed.size:
        index.remove_ids(faiss.IDSelectorBatch(changed.astype(np.int64)))
        index.add_with_ids(emb[changed], changed.astype(np.int64))
    return FaissIndex(index)
