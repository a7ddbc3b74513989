"""The request path of the Redis store: one round trip per Recommend, and fail-open.

A user read is one pipeline to the user's node (the unit's stamp, recent, seen, counters);
item stats and the hot list come from the process's item mirror, no round trip. A read that
fails, or finds the stamp not naming this bundle version, is answered from the bundle's state
and flagged (the engine marks the response degraded).
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from engine.core.context import UserFeatures
from engine.core.state import decay
from engine.store.common import new_user, state_user, top_hot
from engine.store.redis.health import Counters, Health
from engine.store.redis.keys import stamp_key, user_key, user_slot
from engine.store.redis.mirror import ItemMirror
from engine.store.redis.topology import ERRORS, Topology
from engine.store.redis.writes import Rules


def _ids(values: list, n: int) -> np.ndarray:
    """Redis list of item indices -> int32 [n], -1 padded."""
    out = np.full(n, -1, np.int32)
    if values:
        out[:len(values)] = np.array(values).astype(np.int32)
    return out


class Reader:
    def __init__(self, net: Topology, health: Health, counts: Counters, mirror: ItemMirror, rules: Rules,
                 fallback: dict[str, np.ndarray], days: Callable[[], float]):
        """`fallback`: the bundle's end-of-log state arrays, answered from when Redis cannot be;
        `days()`: now on the bundle clock (hot scores are read decayed to it)."""
        self.net, self.health, self.counts, self.mirror, self.rules = net, health, counts, mirror, rules
        self._fb, self._days = fallback, days
        self._local = threading.local()

    def user(self, user_id: str, index: int, default_profile: np.ndarray,
             profiles: np.ndarray) -> UserFeatures:
        L, S = self.rules.recent_len, self.rules.seen_len
        profile = profiles[index] if index >= 0 else default_profile
        slot = user_slot(user_id)
        unit = self.health.unit(slot)
        node = self.health.route(unit)
        if node is not None:
            k = user_key(user_id, slot)
            try:
                p = self.net.client(node).pipeline(transaction=False)
                p.get(stamp_key(unit)).lrange(k + "recent", 0, L - 1).lrange(k + "seen", 0, S - 1)
                p.hmget(k + "n", "imp", "pos")
                stamp, recent, seen, n = p.execute()
                if stamp == self.rules.stamp.raw:
                    return UserFeatures(index, profile[None], _ids(recent, L)[None], _ids(seen, S),
                                        float(n[0] or 0), float(n[1] or 0))
                self.health.lost(f"{stamp_key(unit)} is {stamp!r}, not {self.rules.stamp.name}", node)
            except ERRORS as e:
                self.health.lost(e, node)
        self._fell_back()
        return state_user(self._fb, index, profile) if index >= 0 else new_user(profile, L, S)

    def item_stats(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """From the local mirror: no round trip. Until its first load (or after the DB was
        re-seeded or taken by another bundle version, until it is reloaded): the bundle's
        state, flagged; a mirror that could not sync for MIRROR_STALE_S serves on, flagged."""
        now = self._decay_now()
        imp, pos, hot = self._counters(flag=items.size > 0)
        return imp[items], pos[items], (hot[items] * now).astype(np.float32)

    def hot_top(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        now = self._decay_now()
        top, hot = top_hot(self._counters(flag=True)[2], n)
        return top, hot * now

    def _decay_now(self) -> float:
        return decay(self.rules.t_ref, self._days(), self.rules.half_life)

    def _counters(self, flag: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(impressions, positives, hot) of every item: the mirror, else the bundle's state;
        answers from the bundle or from a stale mirror are flagged when `flag`."""
        m = self.mirror.current
        if flag and (m is None or self.mirror.stale()):
            self._fell_back()
        if m is not None:
            return m.imp, m.pos, m.hot
        return self._fb["item_n_imp"], self._fb["item_n_pos"], self._fb["item_hot"]

    def _fell_back(self) -> None:
        self._local.fell = True
        self.counts.add("fallbacks")

    def fell_back(self) -> bool:
        fell, self._local.fell = getattr(self._local, "fell", False), False
        return fell
