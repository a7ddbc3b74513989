"""The validation gate: a candidate version is published only if, on the held-out freshest
samples, no retrained model's AUC falls more than `auc_margin` below the serving version's.

Both sides score the same rows with the inputs as served: the rankers through their exported
ONNX graphs (the candidate's and the serving version's files), the refreshed id embeddings
through the two-tower score (user tower over the new id rows, dot the new item embedding)
against the score the server computed (the logged `tt_score`). Every task's AUC is reported;
the primary task's decides (the one the coarse DNN predicts and the fine ranker's first output).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model_export.train import auc


@dataclass
class Verdict:
    ok: bool
    reason: str
    auc: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)   # model -> side -> task -> AUC
    rows: int = 0
    positives: int = 0


def validate(scores: dict[str, tuple[np.ndarray, np.ndarray]], labels: np.ndarray, tasks: tuple[str, ...],
             margin: float) -> Verdict:
    """`scores`: model -> (candidate [N, T'], serving [N, T']) scores of the holdout rows, the
    columns being the first T' tasks."""
    v = Verdict(True, "", rows=len(labels), positives=int(labels[:, 0].sum()))
    worse = []
    for name, (cand, serv) in scores.items():
        v.auc[name] = {side: {t: auc(labels[:, k], p[:, k]) for k, t in enumerate(tasks[:p.shape[1]])}
                       for side, p in (("candidate", cand), ("serving", serv))}
        new, old = v.auc[name]["candidate"][tasks[0]], v.auc[name]["serving"][tasks[0]]
        if not np.isfinite(new) or (np.isfinite(old) and new < old - margin):
            worse.append(f"{name} auc_{tasks[0]} {new:.4f} < serving {old:.4f} - margin {margin:g}")
    if worse:
        v.ok, v.reason = False, "; ".join(worse)
    return v
