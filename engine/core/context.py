"""Per-request context: what the engine hydrates once and every stage reads."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.core.request import Request


@dataclass
class UserFeatures:
    """The user's side as the feature store returns it (new users: no history, zero counts)."""

    index: int                  # row in the bundle's user tables, -1 for a new user
    profile: np.ndarray         # int32 [1, P]
    recent: np.ndarray          # int32 [1, L] last positives, most recent first, -1 padded
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
    cache: dict[str, Any] = field(default_factory=dict)  # per-request arrays shared by stages

    def remaining_ms(self) -> float:
        return (self.deadline - time.perf_counter()) * 1000.0
