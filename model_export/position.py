"""Position bias, learnt apart from relevance (PAL: Guo et al., RecSys 2019).

A logged label is "examined and relevant": an item shown in slot p is seen with some
probability e(p), falling down the list, and only a seen item can be clicked. A ranker trained
on the raw labels learns e(p) * relevance, so whatever the serving order put low looks worse
than it is, and a model trained on its own lists (the streaming trainer) confirms its own order:
a new item shown in the last slot earns a third of the clicks it would earn first.

Here the observed probability is modelled as sigmoid(ranker logit) * e(p), with e(0) = 1 and
e(p) = sigmoid(g_p) learnt per slot; the ranker's own output, and so its ONNX graph, is the
relevance alone: serving asks "how good is this item in the top slot", whatever slot it gets.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXAM_INIT = 2.0        # sigmoid(2) = 0.88: a slot without data starts nearly as examined as the first
PRIOR_ROWS = 200.0     # pseudo-rows pulling a slot's first guess towards the slot above's
GAIN = 10.0            # logit = GAIN * parameter: Adam moves a parameter ~lr a step, the curve GAIN times that


class Examination(nn.Module):
    """Log examination probability per slot; slot 0 is 1 (fixes the scale against the ranker's),
    slots past the last learnt one share it."""

    def __init__(self, slots: int):
        super().__init__()
        self.raw = nn.Parameter(torch.full((slots - 1,), EXAM_INIT / GAIN))

    @property
    def logit(self) -> Tensor:
        return self.raw * GAIN

    def start_from(self, position: np.ndarray, positive: np.ndarray) -> None:
        """First guess of the curve: each slot's positive rate over the first slot's, as a ranker
        trained on logs whose order does not depend on relevance would see it; training refines it
        (a step per batch at the rankers' learning rate would take epochs to move it that far)."""
        slots = self.logit.numel() + 1
        p = np.minimum(position.astype(np.int64), slots - 1)
        rows = np.bincount(p, minlength=slots).astype(np.float64)
        pos = np.bincount(p, weights=positive.astype(np.float64), minlength=slots)
        if rows[0] == 0 or pos[0] == 0:
            return
        rate0, e = pos[0] / rows[0], np.ones(slots)
        for k in range(1, slots):     # a sparse slot leans on the one above it: a slot never seen copies it
            e[k] = (pos[k] / rate0 + PRIOR_ROWS * e[k - 1]) / (rows[k] + PRIOR_ROWS)
        e = np.clip(e[1:], 0.02, 0.98)
        with torch.no_grad():
            self.raw.copy_(torch.from_numpy(np.log(e / (1 - e)) / GAIN))

    def log_prob(self, position: Tensor) -> Tensor:
        p = position.long().clamp(0, self.logit.numel())
        logs = torch.cat([torch.zeros(1, dtype=self.logit.dtype), F.logsigmoid(self.logit)])
        return logs[p]

    def curve(self) -> list[float]:
        """e(p) for p = 0 .. slots - 1."""
        with torch.no_grad():
            return [1.0, *torch.sigmoid(self.logit).tolist()]


def label_loss(logits: Tensor, y: Tensor, log_exam: Tensor | None) -> Tensor:
    """Element-wise log loss of the labels `y` (same shape as `logits`: [N] or [N, T]) given the
    ranker's logits and, when the rows carry their slot, its log examination probability [N]."""
    if log_exam is None:
        return F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    if logits.dim() == 2:
        log_exam = log_exam[:, None]
    log_p = F.logsigmoid(logits) + log_exam                   # log P(examined and relevant)
    log_not = torch.log1p(-torch.exp(log_p).clamp(max=1 - 1e-6))
    return -(y * log_p + (1 - y) * log_not)
