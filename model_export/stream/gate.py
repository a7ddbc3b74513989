"""The validation gate: on the held-out freshest samples, a retrained model whose AUC falls
more than `auc_margin` below the serving version's is refused (rolled back to the serving
weights, not published); a version is published with the models that pass, and not at all
when none does.

Both sides score the same held-out rows with the inputs as served: the rankers through their
exported ONNX graphs (the candidate's file and the serving version's), every task's AUC
reported and the primary task's deciding; the refreshed id embeddings by the two-tower's own
objective, how well each held-out click's item outranks the other clicked items for that user
(model_export.stream.embeddings).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

AUCS = dict[str, dict[str, dict[str, float]]]      # model -> "candidate" | "serving" -> task -> AUC


@dataclass
class Verdict:
    passed: list[str]
    failed: dict[str, str]                          # model -> why
    auc: AUCS = field(default_factory=dict)
    rows: int = 0
    positives: int = 0

    @property
    def reason(self) -> str:
        return "; ".join(self.failed.values())


def validate(aucs: AUCS, primary: str, margin: float, rows: int = 0, positives: int = 0) -> Verdict:
    v = Verdict([], {}, aucs, rows, positives)
    for name, sides in aucs.items():
        new, old = sides["candidate"][primary], sides["serving"][primary]
        if not np.isfinite(new) or (np.isfinite(old) and new < old - margin):
            v.failed[name] = f"{name} auc_{primary} {new:.4f} < serving {old:.4f} - margin {margin:g}"
        else:
            v.passed.append(name)
    return v
