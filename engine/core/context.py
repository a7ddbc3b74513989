"""Per-request context: what the engine hydrates once and every stage reads.

Stages declare what they read of it (`ctx:<name>` in engine.core.registry.register). Values
only some stages need are computed on first use and kept for the rest of the request, as
typed properties: no untyped per-request cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from engine.core import featurize
from engine.core.request import Request


@dataclass
class UserFeatures:
    """The user's side as the feature store returns it (new users: no history, zero counts)."""

    index: int                  # row in the bundle's user tables, -1 for a new user
    profile: np.ndarray         # int32 [1, P]
    recent: np.ndarray          # int32 [1, L] last positives of the first task, most recent first, -1 padded
    seen: np.ndarray            # int32 [S] recently impressed items
    n_imp: float
    n_pos: float


@dataclass
class RequestContext:
    request: Request
    user: UserFeatures
    context: np.ndarray         # int32 [1, K] hour, device, ...
    user_e: np.ndarray          # float32 [1, d] two-tower user embedding, computed once
    exclude: np.ndarray         # int32 item indices the request excludes
    now: float                  # days on the bundle's clock
    deadline: float             # time.perf_counter() value
    experiment: str
    tables: featurize.Tables    # the serving bundle's, for the values computed on first use
    _ranker_user: np.ndarray | None = field(default=None, repr=False)
    _i2i: featurize.I2IScores | None = field(default=None, repr=False)

    @property
    def ranker_user(self) -> np.ndarray:
        """float32 [1, Du'] the rankers' user row (coarse phase 2 and the fine ranker share it).
        Stages run one after another on the request thread, so no lock is needed."""
        if self._ranker_user is None:
            self._ranker_user = featurize.ranker_user_input(self.tables, self.user_e, self.user.profile,
                                                            self.context)
        return self._ranker_user

    @property
    def i2i(self) -> featurize.I2IScores:
        """The user's i2i scores (the neighbours of their recent items, recency-weighted): the
        recall_i2i route's candidates and the rankers' i2i feature, computed once per request.
        Recall routes that read it run inline (on the request thread) before any stage."""
        if self._i2i is None:
            self._i2i = featurize.i2i_scores(self.tables.i2i, self.user.recent)
        return self._i2i

    def remaining_ms(self) -> float:
        return (self.deadline - time.perf_counter()) * 1000.0
