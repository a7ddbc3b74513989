"""The training step of the dense rankers (coarse DNN, fine MMoE), warm-started from a version's
checkpoints: one pass over each chunk of joined samples, Adam state carried across chunks and
saved with every published version, so a restart continues the same optimisation.

The rows are the ranker inputs as the server computed them (engine.core.request.ServedInputs),
so there is nothing to re-featurize; only the fine ranker's sequence input is rebuilt from the
logged `recent` ids and the item embeddings of the version that served the row (SeqSource).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.core.sections import StreamConfig
from model_export.export import ort_session
from model_export.stream.samples import Samples
from model_export.stream.tables import SeqSource
from model_export.position import label_loss
from model_export.train import _tensors, auc, positions

RANKERS = ("coarse_dnn", "fine")
OPTIMIZER = "optimizer.pt"


class RankerLearner:
    """The rankers named in `stream.models`, their Adam optimizers, one chunk at a time."""

    def __init__(self, checkpoints: Path, loaded: dict[str, nn.Module], cfg: StreamConfig, tasks: tuple[str, ...]):
        """`loaded`: the modules models.load_checkpoints(checkpoints) returned, read once per start for
        every learner; `checkpoints` still holds the optimiser state."""
        self.cfg, self.tasks = cfg, tasks
        self.names = [n for n in RANKERS if n in cfg.models]
        self.models: dict[str, nn.Module] = {n: loaded[n] for n in self.names}
        self.opt = {n: torch.optim.Adam(m.parameters(), lr=cfg.lr) for n, m in self.models.items()}
        saved = checkpoints / OPTIMIZER
        if saved.is_file():           # a streamed version: continue its optimiser, not a fresh one
            states = torch.load(saved, weights_only=True)
            for n, o in self.opt.items():
                if n in states:
                    o.load_state_dict(states[n])
                    for g in o.param_groups:
                        g["lr"] = cfg.lr

    def train(self, s: Samples, seq: SeqSource, rng: np.random.Generator, rows=None) -> dict[str, float]:
        """One pass over `s` in shuffled mini-batches; mean loss per model.

        `rows` (an EmbeddingLearner): the user and item embeddings of each row are recomputed
        from its current id rows through the frozen towers and spliced into the logged inputs
        (with the two-tower score they make), so the rankers' loss also trains the id rows of
        every user and item shown, clicked or not: a per-user and per-item correction learnt
        online, which the rankers' shared weights cannot hold."""
        n, bs = len(s), self.cfg.batch_size
        perm = rng.permutation(n)
        y = torch.from_numpy(s.rows.labels)
        totals = dict.fromkeys(self.names, 0.0)
        for m in self.models.values():
            m.train()
        for k in range(0, n, bs):
            b = np.sort(perm[k:k + bs])
            user, item = _tensors(s.rows, b)
            if rows is not None:
                user, item = rows.splice(s, b, user, item)
            losses = {}
            slot = positions(s.rows, b) if self.cfg.position_bias else None
            for name, model in self.models.items():
                if name == "fine":
                    sq, mask = seq(s.rows.recent[b], s.versions[b])
                    logits = model.logits(user, item, torch.from_numpy(sq), torch.from_numpy(mask))
                    losses[name] = label_loss(logits, y[b], model.log_exam(slot)).mean(0).sum()
                else:
                    losses[name] = label_loss(model.logits(user, item), y[b][:, 0], model.log_exam(slot)).mean()
            opts = [*self.opt.values(), *([rows.opt] if rows is not None else [])]
            for o in opts:
                o.zero_grad()
            sum(losses.values()).backward()      # each model's weights get their own loss's gradient
            for o in opts:
                o.step()
            for name, loss in losses.items():
                totals[name] += loss.item() * b.size
        for m in self.models.values():
            m.eval()
        if rows is not None:
            rows.mark(s, np.arange(n))
        return {name: t / max(n, 1) for name, t in totals.items()}

    def snapshot(self) -> dict[str, Any]:
        """Weights and optimiser state per model, to roll back to when a candidate is refused."""
        return copy.deepcopy({n: {"model": m.state_dict(), "opt": self.opt[n].state_dict()}
                              for n, m in self.models.items()})

    def restore(self, snap: dict[str, Any], names: set[str] | None = None) -> None:
        for n, m in self.models.items():
            if names is None or n in names:
                m.load_state_dict(snap[n]["model"])
                self.opt[n].load_state_dict(snap[n]["opt"])

    def save(self, out: Path) -> None:
        """The trained rankers' state_dicts and the optimiser state, into a version's checkpoints."""
        for name, model in self.models.items():
            torch.save(model.state_dict(), out / f"{name}.pt")
        torch.save({n: o.state_dict() for n, o in self.opt.items()}, out / OPTIMIZER)

    def evaluate(self, candidate: tuple[dict[str, Path], Samples, SeqSource],
                 serving: tuple[dict[str, Path], Samples, SeqSource]) -> dict[str, dict[str, dict[str, float]]]:
        """Every task's AUC of each ranker's candidate and serving ONNX graph, each side (graph
        files, rows, sequence source) on the inputs it would serve with; the labels are the same."""
        y = serving[1].rows.labels
        out = {}
        for name in self.names:
            sides = {side: onnx_predict(paths[name], name, rows, seq)
                     for side, (paths, rows, seq) in (("candidate", candidate), ("serving", serving))}
            out[name] = {side: {t: auc(y[:, k], p[:, k]) for k, t in enumerate(self.tasks[:p.shape[1]])}
                         for side, p in sides.items()}
        return out


def onnx_predict(path: Path, name: str, s: Samples, seq: SeqSource, chunk: int = 4096) -> np.ndarray:
    """[N, T] probabilities (coarse DNN: [N, 1]) of the ranker graph at `path` over the rows, with
    the inputs as served."""
    sess = ort_session(path)
    out = []
    for k in range(0, len(s), chunk):
        b = slice(k, k + chunk)
        feeds = {"user": s.rows.user[b], "item": s.rows.item[b]}
        if name == "fine":
            feeds["seq"], feeds["seq_mask"] = seq(s.rows.recent[b], s.versions[b])
        out.append(sess.run(None, feeds)[0])
    p = np.concatenate(out) if out else np.zeros((0,), np.float32)
    return p.reshape(len(s), -1)
