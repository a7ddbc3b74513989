"""Fine ranking: the multi-task model (shared experts, a gate and a tower per task, target
attention over the user's recent items), one batched ONNX call over the coarse survivors.
Adds one score column per task, `task:<name>` (engine.core.candidates.task_column).

The only skippable kind: under deadline pressure the engine skips it and the rerank fuses
the latest coarse score instead, so a late request still gets a ranked list."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core import featurize
from engine.core.candidates import Candidates, Guarantee, task_column
from engine.core.errors import ConfigError
from engine.core.registry import TASK_SCORES, BudgetParams, CutParams, Policy, StageEnv, register


@dataclass
class Params(CutParams, BudgetParams):
    keep: int = 0                 # 0: keep all; else truncate by the first task
    budget_ms: float = 15.0

    def check(self) -> None:
        if self.keep < 0:
            raise ConfigError("keep: must be >= 0 (0 keeps all)")
        BudgetParams.check(self)


@register("rank_multitask", Params, policy=Policy(skippable=True),
          reads=("feat:item_e", "feat:coarse_x", "ctx:ranker_user", "ctx:user"),
          reads_if_present=("feat:ranker_item",), writes=(TASK_SCORES,))
class RankMultitask:
    def __init__(self, p: Params, env: StageEnv):
        self.keep, self.models, self.tables = p.keep, env.models, env.bundle.tables
        self.tasks = env.bundle.tasks

    def __call__(self, ctx, c: Candidates) -> Candidates:
        item = c.feats.get("ranker_item")     # coarse phase 2's, when it ran
        if item is None:
            item = featurize.ranker_item_input(c.feats["item_e"], c.feats["coarse_x"])
        seq, mask = featurize.sequence_input(self.tables, ctx.user.recent)
        feeds = {"user": ctx.ranker_user, "item": item, "seq": seq, "seq_mask": mask}
        probs = self.models.run("fine", feeds, timeout_s=max(ctx.remaining_ms(), 0.0) / 1e3)   # bounds a remote one
        c = c.with_columns({task_column(t): probs[:, i] for i, t in enumerate(self.tasks)},
                           primary=task_column(self.tasks[0]))
        if self.keep:
            return c.keep_top(np.asarray(probs[:, 0]), self.keep, Guarantee.FINE)
        return c
