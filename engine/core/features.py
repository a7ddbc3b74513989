"""What the runtime asks of a feature store, and the clock it keeps.

The protocol lives here, in the core that consumes it, so the backends in engine/store
depend on the core and never the reverse: the engine is handed a store factory and does
not know which backend it talks to.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.core.context import UserFeatures


@dataclass(slots=True)
class ResolvedEvent:
    kind: str
    user: int          # bundle user index, or -1
    user_id: str
    item: int          # bundle item index (validated)
    t: float           # days on the bundle clock


class BundleClock:
    """Days on the bundle's clock: the log ends (t_end) at the moment the bundle was built."""

    def __init__(self, manifest: dict):
        self.t_end = float(manifest["time"]["t_end"])
        self.created = float(manifest["created_unix"])

    def days(self, unix: float | None = None) -> float:
        return self.t_end + ((time.time() if unix is None else unix) - self.created) / 86400.0


class FeatureStore(Protocol):
    """What the engine and stages ask of a backend: one vectorised call per kind of feature."""

    name: str
    clock: BundleClock

    def user(self, user_id: str, index: int, default_profile: np.ndarray,
             profiles: np.ndarray) -> UserFeatures: ...

    def item_stats(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Impressions, positives and hot score as of now of the given items."""

    def hot_top(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The `n` hottest items, best first, and their hot scores as of now."""

    def apply(self, events: list[ResolvedEvent]) -> None:
        """Record events; raises engine.core.errors.Overloaded when they cannot be taken."""

    def fell_back(self) -> bool:
        """Whether a read on this thread was served from the bundle's state instead of the
        live state since the last call (which resets it): the engine marks the answer degraded."""

    def stats(self) -> dict[str, int]:
        """Counters for status and metrics."""

    def close(self) -> None: ...
