"""Embedded feature store: the live state in arrays, shared by the worker processes of one server.

The default backend (engine.store.redis shares one state between servers; engine.store.factory
picks one from a URL). It keeps the bundle's feature state (engine.core.state.FeatureState) in
arrays; given a directory (the server passes one under /dev/shm) they are memory-mapped files
there, so an event reported to one worker is seen by the others on their next request. Writes
take an fcntl lock on that directory; reads take none (a torn read costs at most one stale
counter). Given a state directory too, every batch is logged (fsync'd) before it is
acknowledged and the state is snapshotted there (engine.store.persistence): an acknowledged
event survives a restart, SIGKILL and a new model bundle over the same catalog.

Users the bundle does not know get a slot in a fixed-size guest table, found by a 64-bit hash
of their id with linear probing, so new users build history too. State semantics are those of
engine.core.state.snapshot (the training features): `seen` holds the last impressions (repeats
included), `recent` the last primary-task positives, and hot scores are stored relative to the
bundle's `t_ref` but read decayed to the clock's now. What persists, and what each guarantee
costs: docs/feature_store.md.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import threading
from pathlib import Path

import numpy as np

from engine.core import pages
from engine.core.bundle import Bundle
from engine.core.context import UserFeatures
from engine.core.features import BundleClock, ResolvedEvent
from engine.core.state import decay
from engine.store.common import catalog_id, new_user, state_user, top_hot
from engine.store.eventlog import new_meta
from engine.store.persistence import Persistence

GUEST_SLOTS = 1 << 16
_PROBES = 16
_GUEST = ("guest_key", "guest_recent", "guest_seen", "guest_counts")
IMPRESSION, POSITIVE = 1, 2     # flags of a logged event


def _key(user_id: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=8).digest(), "little") | 1)


class EmbeddedStore:
    name = "embedded"

    def __init__(self, bundle: Bundle, shared_dir: str | Path | None = None, state_dir: str | Path | None = None,
                 snapshot_s: float = 60.0, snapshot_writer: bool = True):
        """`state_dir`: persist there (None: in memory only); `snapshot_writer`: this process
        writes the periodic snapshots (one per shared dir is enough)."""
        st = bundle.state
        self.version = bundle.version
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
        self.catalog = catalog_id(bundle)
        # One folder per catalog: a bundle over another catalog gets new files instead of
        # truncating the ones an older store (still finishing requests) has mapped, and a
        # worker restarted on a newer model bundle over the same catalog joins the live state.
        self._dir = Path(shared_dir) / hashlib.sha256(self.catalog.encode()).hexdigest()[:16] if shared_dir else None
        self._tlock = threading.Lock()
        self._persist: Persistence | None = None
        meta_name = f"eventlog-{self.catalog[:16]}"
        if self._dir is None:
            self.a = {k: np.array(v) for k, v in init.items()}
            if state_dir:
                self._persist = self._persistence(state_dir, new_meta(), None)
                self._persist.restore(self._apply)
        else:
            self._dir.mkdir(parents=True, exist_ok=True)
            with self._write_lock():
                stamp = self._dir / "ready"
                fresh = not stamp.exists()
                self.a = {k: self._open(k, v, fresh) for k, v in init.items()}
                if state_dir:
                    meta = self._open(meta_name, new_meta(), fresh)
                    self._persist = self._persistence(state_dir, meta, self._dir / f"{meta_name}.sync")
                    if fresh:
                        self._persist.restore(self._apply)
                if fresh:
                    stamp.write_text(self.catalog)
        for v in init.values():
            pages.drop(v)
        if self._dir is not None:       # the shared arrays, whole: RSS stays flat as users come by
            for v in self.a.values():
                pages.populate(v)
        if self._persist and snapshot_writer:
            self._persist.start_snapshots(snapshot_s)

    def _persistence(self, state_dir: str | Path, meta: np.ndarray, sync_file: Path | None) -> Persistence:
        return Persistence(state_dir, self.catalog, self.version, meta, self._write_lock, sync_file,
                           self._state, self._load)

    def _open(self, name: str, init: np.ndarray, fresh: bool) -> np.ndarray:
        path = self._dir / f"{name}.npy"
        if fresh or not path.exists():
            m = np.lib.format.open_memmap(path, mode="w+", dtype=init.dtype, shape=init.shape)
            m[...] = init
            m.flush()
            return np.asarray(m)            # plain views: see bundle.load_bundle
        return np.asarray(np.load(path, mmap_mode="r+"))

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

    # -- persistence ------------------------------------------------------------------
    def _state(self) -> dict[str, np.ndarray]:
        """The state for a snapshot (under the write lock): the live arrays, guest rows only where used."""
        slots = np.flatnonzero(self.a["guest_key"])
        arrays = {k: v[slots] if k in _GUEST else v for k, v in self.a.items()}
        arrays["guest_slot"] = slots
        return arrays

    def _load(self, got: dict[str, np.ndarray]) -> None:
        slots = got.pop("guest_slot")
        for k, v in got.items():
            if k in _GUEST:
                self.a[k][slots] = v
            else:
                self.a[k][...] = v

    def save(self) -> None:
        """Snapshot now (the state dir's snapshot and log rotation; engine.store.persistence)."""
        self._persist.save()

    @property
    def snapshots(self) -> int:
        return self._persist.snapshots if self._persist else 0

    def close(self) -> None:
        """Stop the snapshot thread and write a last snapshot: every process sharing the arrays
        does, so the last one to stop includes every event any of them acknowledged."""
        if self._persist:
            self._persist.close()

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
            return state_user(a, index, profiles[index])
        s = self._guest_slot(user_id, create=False)
        if s < 0:
            return new_user(default_profile, a["user_recent"].shape[1], a["user_seen"].shape[1])
        c = a["guest_counts"][s]
        return UserFeatures(-1, default_profile[None], a["guest_recent"][s][None].copy(),
                            a["guest_seen"][s].copy(), float(c[0]), float(c[1]))

    def item_stats(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = self.a
        hot = a["item_hot"][items] * decay(self.t_ref, self.clock.days(), self.half_life)
        return a["item_n_imp"][items], a["item_n_pos"][items], hot.astype(np.float32)

    def hot_top(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        top, hot = top_hot(self.a["item_hot"], n)
        return top, hot * decay(self.t_ref, self.clock.days(), self.half_life)

    def fell_back(self) -> bool:
        return False

    def stats(self) -> dict[str, int]:
        if self._persist is None:
            return {"snapshots": 0}
        return {"snapshots": self._persist.snapshots, "log_fsyncs": self._persist.log.fsyncs}

    # -- writes (event path) ----------------------------------------------------------
    def apply(self, events: list[ResolvedEvent]) -> None:
        """Apply a batch; with a state dir, return only once it is logged and fsync'd (raises
        engine.core.errors.Overloaded when the log cannot be written: nothing acknowledged)."""
        records = []
        for e in events:
            flags = (e.kind == "impression") * IMPRESSION | (e.kind == self.primary) * POSITIVE
            if flags:   # other kinds change no feature: nothing to apply or log
                records.append((flags, int(e.user), e.user_id, int(e.item), float(e.t)))
        if not records:
            return
        with self._write_lock():   # logged and applied in one order, the order a replay repeats
            seq = self._persist.append(records) if self._persist else 0
            self._apply(records)
        if seq:
            self._persist.commit(seq)

    def _apply(self, records: list) -> None:
        """(flags, user index or -1, user id, item, t) records into the arrays; caller holds the lock."""
        a = self.a
        for flags, user, user_id, item, t in records:
            imp, pos = flags & IMPRESSION, flags & POSITIVE
            if imp:
                a["item_n_imp"][item] += 1
            if pos:
                a["item_n_pos"][item] += 1
                a["item_hot"][item] += decay(t, self.t_ref, self.half_life)
            if user >= 0:
                recent, seen = a["user_recent"][user], a["user_seen"][user]
                n_imp, n_pos = a["user_n_imp"][user:user + 1], a["user_n_pos"][user:user + 1]
            else:
                s = self._guest_slot(user_id, create=True)
                if s < 0:
                    continue  # guest table full around this hash: no history, the items still counted
                recent, seen = a["guest_recent"][s], a["guest_seen"][s]
                n_imp, n_pos = a["guest_counts"][s, 0:1], a["guest_counts"][s, 1:2]
            if imp:
                n_imp += 1
                seen[1:] = seen[:-1]
                seen[0] = item
            if pos:
                n_pos += 1
                recent[1:] = recent[:-1]
                recent[0] = item
