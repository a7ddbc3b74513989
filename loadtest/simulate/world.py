"""The simulated users: who asks, in which context, what they do with a list, and how the world
drifts. Everything comes from the synthetic world's ground truth (model_export.world.WorldTruth).

- `active` users are online, drawn in proportion to their logged activity (heavy users are
  more often online); each asks at the same rate, with the context of one of their logged
  sessions.
- A served list is answered as the world's logging policy's lists were: position p is examined
  with probability (1 + p)^-EXAM_DECAY; an examined item is clicked with the true p(click), and
  a click is liked / finished with the true conditional probabilities.
- The drift: `shift_share` of the users take on the tastes of another shifted user (a cycle over
  them, so the population's tastes stay the same as a whole), and the world's cold items (in the
  catalog, never logged: a batch nobody has interacted with) launch, gaining `launch_quality`.
- Utility is `recserve eval`'s: the true fused value (the served rerank's fusion of the true task
  probabilities) discounted by position, normalised between a uniform list (0) and the oracle's
  top list (1) over the items the user is eligible for (not seen recently).
"""
from __future__ import annotations

import copy
import threading
from collections import OrderedDict

import numpy as np

from model_export.dataset import Dataset
from model_export.evaluate import COUNT, DISCOUNT, _fused, _top
from model_export.world import EXAM_DECAY
from stages.rerank_beam import Params as RerankParams

VALUE_CACHE = 512          # users whose true value vector is kept (catalog floats each)


class SimWorld:
    def __init__(self, ds: Dataset, rerank: RerankParams, active: int, seed: int, shift_share: float = 0.5):
        if ds.truth is None:
            raise ValueError(f"{ds.name}: the simulator needs the synthetic world's ground truth")
        self.ds, self.truth, self.rp = ds, ds.truth, rerank
        activity = np.bincount(ds.log_user, minlength=ds.n_users).astype(np.float64)
        self.active = np.sort(np.random.default_rng([seed, 0]).choice(
            ds.n_users, min(active, ds.n_users), replace=False, p=activity / activity.sum()))
        self.cold = np.bincount(ds.log_item, minlength=ds.n_items) == 0
        order = np.argsort(ds.log_user, kind="stable")
        self._ctx_rows = order
        self._ctx_start = np.searchsorted(ds.log_user[order], np.arange(ds.n_users + 1))
        # who shifts is drawn up front, so their utility before the drift can be told apart too
        self.shifted = np.sort(np.random.default_rng([seed, 1]).choice(
            ds.n_users, int(round(shift_share * ds.n_users)), replace=False))
        self.drifted = False
        self._values: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._seed = seed

    def user(self, rng: np.random.Generator) -> tuple[int, dict[str, int]]:
        """An online user and the context of one of their logged sessions."""
        u = int(self.active[rng.integers(self.active.size)])
        return u, self.context(u, rng)

    def context(self, u: int, rng: np.random.Generator) -> dict[str, int]:
        lo, hi = self._ctx_start[u], self._ctx_start[u + 1]
        row = self._ctx_rows[rng.integers(lo, hi)] if hi > lo else None
        ctx = self.ds.log_context[row].tolist() if row is not None else [0] * len(self.ds.context_fields)
        return dict(zip(self.ds.context_fields, ctx))

    def drift(self, launch_quality: float) -> dict[str, int]:
        """Shift the chosen users' tastes and launch the cold items; the truth changes for good."""
        t = copy.copy(self.truth)
        donor = np.roll(self.shifted, 1)
        t.user_latent = self.truth.user_latent.copy()
        t.user_log_aff = self.truth.user_log_aff.copy()
        t.user_latent[self.shifted] = self.truth.user_latent[donor]
        t.user_log_aff[self.shifted] = self.truth.user_log_aff[donor]
        t.item_quality = (self.truth.item_quality + launch_quality * self.cold).astype(np.float32)
        with self._lock:
            self.truth, self.drifted = t, True
            self._values.clear()
        return {"shifted_users": int(self.shifted.size), "launched_items": int(self.cold.sum())}

    def is_shifted(self, u: int) -> bool:
        i = np.searchsorted(self.shifted, u)
        return bool(i < self.shifted.size and self.shifted[i] == u)

    def value(self, u: int) -> np.ndarray:
        """True fused value of every catalog item for user u, under the truth as it is now."""
        with self._lock:
            v = self._values.get(u)
            if v is not None:
                self._values.move_to_end(u)
                return v
            truth = self.truth
        v = _fused(truth.user_probs(u), self.ds.tasks, self.rp)
        with self._lock:
            if truth is self.truth:
                self._values[u] = v
                if len(self._values) > VALUE_CACHE:
                    self._values.popitem(last=False)
        return v

    def respond(self, u: int, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """bool [n, 3]: click, like, finish for the items in served order (position bias included)."""
        n = items.size
        p = self.truth.conditional(np.full(n, u), items)
        examined = rng.random(n) < (1.0 + np.arange(n)) ** -EXAM_DECAY
        click = examined & (rng.random(n) < p[:, 0])
        return np.stack([click, click & (rng.random(n) < p[:, 1]), click & (rng.random(n) < p[:, 2])], 1)


def unseen(seen: np.ndarray, n_items: int) -> np.ndarray:
    """The items a user may be served: all but the ones in `seen` (-1 padded)."""
    mask = np.ones(n_items, bool)
    mask[seen[seen >= 0]] = False
    return np.flatnonzero(mask)


def scores(value: np.ndarray, served: np.ndarray, eligible: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """(utility of the served list, of the oracle's top list, expected of a uniform list, the
    oracle's list) over the eligible items, as `recserve eval` scores lists."""
    top = _top(eligible, value[eligible])
    k = min(COUNT, served.size)
    return (float(value[served[:k]] @ DISCOUNT[:k]), float(value[top] @ DISCOUNT[:top.size]),
            float(value[eligible].mean() * DISCOUNT.sum()), top)


class Seen:
    """What one server's seen filter holds for each user, as the simulator fed it: the bundle's
    seen list at start, then every item reported as an impression (last `window`)."""

    def __init__(self, initial: np.ndarray, window: int):
        self.initial, self.window = initial, window
        self._by_user: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def eligible(self, u: int, n_items: int) -> np.ndarray:
        with self._lock:
            seen = self._by_user.get(u)
        return unseen(self.initial[u] if seen is None else seen, n_items)

    def add(self, u: int, items: np.ndarray) -> None:
        with self._lock:
            seen = self._by_user.get(u)
            if seen is None:
                seen = np.asarray(self.initial[u])
            self._by_user[u] = np.concatenate([items[::-1], seen[seen >= 0]])[:self.window]
