"""Fine ranking: the multi-task model (shared experts, a gate and a tower per task, target
attention over the user's recent items), one batched ONNX call over the coarse survivors.
Adds one score column per task, named `task:<name>`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core import featurize
from engine.core.candidates import Candidates, Guarantee
from engine.core.errors import ConfigError
from engine.core.registry import StageEnv, register
from stages.rank_dnn import ranker_user


@dataclass
class Params:
    keep: int = 0                 # 0: keep all; else truncate by the first task
    budget_ms: float = 15.0

    def check(self) -> None:
        if self.keep < 0 or self.budget_ms <= 0:
            raise ConfigError("keep >= 0, budget_ms > 0")


@register("rank_multitask", Params, requires=("trees",), provides=("tasks",))
class RankMultitask:
    skippable = True              # under deadline pressure the engine reranks on coarse scores

    def __init__(self, p: Params, env: StageEnv):
        self.keep, self.models, self.tables = p.keep, env.models, env.bundle.tables
        self.tasks = env.bundle.tasks

    def __call__(self, ctx, c: Candidates) -> Candidates:
        item = c.feats.get("ranker_item")
        if item is None:
            item = featurize.ranker_item_input(c.feats["item_e"], c.feats["coarse_x"])
        seq, mask = featurize.sequence_input(self.tables, ctx.user.recent)
        feeds = {"user": ranker_user(ctx, self.tables), "item": item, "seq": seq, "seq_mask": mask}
        probs = self.models.run("fine", feeds, timeout_s=max(ctx.remaining_ms(), 0.0) / 1e3)   # bounds a remote one
        c = c.with_columns({f"task:{t}": probs[:, i] for i, t in enumerate(self.tasks)},
                           primary=f"task:{self.tasks[0]}")
        if self.keep:
            return c.keep_top(np.asarray(probs[:, 0]), self.keep, Guarantee.FINE)
        return c
