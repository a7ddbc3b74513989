"""Feature store: user state and item counters, read per request, updated by events.

The embedded backend keeps the bundle's feature state (engine.state.FeatureState) in
arrays. Given a directory (the server passes one under /dev/shm), the arrays are
memory-mapped files there, so every worker process of one server reads and writes the
same state: an event reported to one worker is seen by the others on their next request.
Writes take an fcntl lock on that directory; reads take none (a torn read costs at most
one stale counter).

Users the bundle does not know get a slot in a fixed-size guest table, found by a 64-bit
hash of their id with linear probing, so new users build history too.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from engine.bundle import Bundle
from engine.context import UserFeatures

GUEST_SLOTS = 1 << 16
_PROBES = 16
POSITIVE_KINDS = ("click", "like", "finish")


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

    def item_stats(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def hot_top(self, n: int) -> tuple[np.ndarray, np.ndarray]: ...

    def apply(self, events: list[ResolvedEvent]) -> None: ...


def _key(user_id: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=8).digest(), "little") | 1)


class EmbeddedStore:
    name = "embedded"

    def __init__(self, bundle: Bundle, shared_dir: str | Path | None = None):
        st = bundle.state
        self.primary = bundle.tasks[0]
        self.half_life = float(bundle.manifest["state"]["half_life_days"])
        self.t_ref = float(st.t_ref)
        self.clock = BundleClock(bundle.manifest)
        L, S = st.user_recent.shape[1], st.user_seen.shape[1]
        init = {**st.arrays(),
                "guest_key": np.zeros(GUEST_SLOTS, np.uint64),
                "guest_recent": np.full((GUEST_SLOTS, L), -1, np.int32),
                "guest_seen": np.full((GUEST_SLOTS, S), -1, np.int32),
                "guest_counts": np.zeros((GUEST_SLOTS, 2), np.float32)}
        self._dir = Path(shared_dir) if shared_dir else None
        if self._dir is None:
            self.a = {k: np.array(v) for k, v in init.items()}
            self._tlock = threading.Lock()
        else:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._tlock = threading.Lock()
            with self._write_lock():
                stamp = self._dir / "bundle"
                fresh = not stamp.exists() or stamp.read_text() != bundle.version
                self.a = {k: self._open(k, v, fresh) for k, v in init.items()}
                if fresh:
                    stamp.write_text(bundle.version)

    def _open(self, name: str, init: np.ndarray, fresh: bool) -> np.ndarray:
        path = self._dir / f"{name}.npy"
        if fresh or not path.exists():
            m = np.lib.format.open_memmap(path, mode="w+", dtype=init.dtype, shape=init.shape)
            m[...] = init
            m.flush()
            return m
        return np.load(path, mmap_mode="r+")

    @contextlib.contextmanager
    def _write_lock(self):
        with self._tlock:
            if self._dir is None:
                yield
                return
            with open(self._dir / "lock", "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

    # -- reads (hot path) -------------------------------------------------------------
    def _guest_slot(self, user_id: str, create: bool) -> int:
        key, keys = _key(user_id), self.a["guest_key"]
        h = int(key % np.uint64(GUEST_SLOTS))
        for i in range(_PROBES):
            s = (h + i) % GUEST_SLOTS
            if keys[s] == key:
                return s
            if keys[s] == 0:
                if create:
                    keys[s] = key
                    return s
                return -1
        return -1

    def user(self, user_id: str, index: int, default_profile: np.ndarray,
             profiles: np.ndarray) -> UserFeatures:
        a = self.a
        if index >= 0:
            return UserFeatures(index, profiles[index][None], a["user_recent"][index][None].copy(),
                                a["user_seen"][index].copy(), float(a["user_n_imp"][index]),
                                float(a["user_n_pos"][index]))
        s = self._guest_slot(user_id, create=False)
        L, S = a["user_recent"].shape[1], a["user_seen"].shape[1]
        if s < 0:
            return UserFeatures(-1, default_profile[None], np.full((1, L), -1, np.int32),
                                np.full(S, -1, np.int32), 0.0, 0.0)
        c = a["guest_counts"][s]
        return UserFeatures(-1, default_profile[None], a["guest_recent"][s][None].copy(),
                            a["guest_seen"][s].copy(), float(c[0]), float(c[1]))

    def item_stats(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Impressions, positives and hot score (relative to `t_ref`) of the given items."""
        a = self.a
        return a["item_n_imp"][items], a["item_n_pos"][items], a["item_hot"][items].astype(np.float32)

    def hot_top(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The `n` items with the highest decayed score, best first, and their scores."""
        hot = self.a["item_hot"]
        n = min(n, hot.size)
        top = np.argpartition(-hot, n - 1)[:n] if n < hot.size else np.arange(hot.size)
        top = top[np.argsort(-hot[top], kind="stable")]
        return top.astype(np.int32), np.asarray(hot[top], np.float64)

    # -- writes (event path) ----------------------------------------------------------
    def apply(self, events: list[ResolvedEvent]) -> None:
        a = self.a
        with self._write_lock():
            for e in events:
                if e.user >= 0:
                    recent, seen, n_imp, n_pos = (a["user_recent"][e.user], a["user_seen"][e.user],
                                                  a["user_n_imp"][e.user:e.user + 1],
                                                  a["user_n_pos"][e.user:e.user + 1])
                else:
                    s = self._guest_slot(e.user_id, create=True)
                    if s < 0:
                        continue  # guest table full around this hash: item counters still count
                    recent, seen = a["guest_recent"][s], a["guest_seen"][s]
                    n_imp, n_pos = a["guest_counts"][s, 0:1], a["guest_counts"][s, 1:2]
                if e.kind == "impression":
                    n_imp += 1
                    a["item_n_imp"][e.item] += 1
                if e.item not in seen:
                    seen[1:] = seen[:-1]
                    seen[0] = e.item
                if e.kind == self.primary:
                    n_pos += 1
                    a["item_n_pos"][e.item] += 1
                    a["item_hot"][e.item] += np.exp2((e.t - self.t_ref) / self.half_life)
                    recent[1:] = recent[:-1]
                    recent[0] = e.item
