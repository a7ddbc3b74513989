"""Feature store: user state and item counters, read per request, updated by events.

Two backends behind one protocol (engine.core.features.FeatureStore): the embedded default
here, and Redis (engine.store.redis) for several server processes or machines sharing
one state; engine.store.factory picks one from a URL.

The embedded backend keeps the bundle's feature state (engine.core.state.FeatureState) in
arrays. Given a directory (the server passes one under /dev/shm), the arrays are
memory-mapped files there, so every worker process of one server reads and writes the
same state: an event reported to one worker is seen by the others on their next request.
Writes take an fcntl lock on that directory; reads take none (a torn read costs at most
one stale counter). Given a state directory too, the state is snapshotted there with
msgpack every `snapshot_s` and at close, and reloaded at start when the snapshot was taken
over the same catalog (`catalog_id`), so acknowledged events survive a clean restart and a
new model bundle over the same items and users.

Users the bundle does not know get a slot in a fixed-size guest table, found by a 64-bit
hash of their id with linear probing, so new users build history too.

State semantics are those of engine.core.state.snapshot (the training features): `seen` holds
the last impressions (repeats included), `recent` the last primary-task positives, and hot
scores are stored relative to the bundle's `t_ref` but read decayed to the clock's now.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import msgpack
import numpy as np

from engine.core.bundle import Bundle
from engine.core.context import UserFeatures
from engine.core.features import BundleClock, ResolvedEvent
from engine.core.state import decay
from engine.store.common import catalog_id, new_user, state_user, top_hot

log = logging.getLogger("recserve.store")

GUEST_SLOTS = 1 << 16
_PROBES = 16
_GUEST = ("guest_key", "guest_recent", "guest_seen", "guest_counts")
SNAPSHOT_FORMAT = 1


def _key(user_id: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=8).digest(), "little") | 1)


class EmbeddedStore:
    name = "embedded"

    def __init__(self, bundle: Bundle, shared_dir: str | Path | None = None, state_dir: str | Path | None = None,
                 snapshot_s: float = 60.0, snapshot_writer: bool = True):
        """`snapshot_writer`: this process writes the periodic snapshots (one per shared dir is enough)."""
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
        self._dir = Path(shared_dir) if shared_dir else None
        self.catalog = catalog_id(bundle)
        self._state_file = Path(state_dir) / f"embedded-{self.catalog[:16]}.msgpack" if state_dir else None
        self._tlock = threading.Lock()
        self.snapshots = 0
        if self._dir is None:
            self.a = {k: np.array(v) for k, v in init.items()}
            self._load()
        else:
            self._dir.mkdir(parents=True, exist_ok=True)
            with self._write_lock():
                stamp = self._dir / "bundle"
                fresh = not stamp.exists() or stamp.read_text() != bundle.version
                self.a = {k: self._open(k, v, fresh) for k, v in init.items()}
                if fresh:
                    self._load()
                    stamp.write_text(bundle.version)
        self._stop = threading.Event()
        self._thread = None
        if self._state_file and snapshot_writer:
            self._thread = threading.Thread(target=self._snapshot_loop, args=(snapshot_s,), name="store-snapshot",
                                            daemon=True)
            self._thread.start()

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

    # -- persistence ------------------------------------------------------------------
    def save(self) -> None:
        """Write the state to the state dir atomically (tmp file + rename); guest rows only where used."""
        with self._write_lock():
            slots = np.flatnonzero(self.a["guest_key"])
            arrays = {k: v[slots] if k in _GUEST else np.array(v) for k, v in self.a.items()}
        arrays["guest_slot"] = slots
        tmp = self._state_file.with_name(f".{self._state_file.name}.{os.getpid()}.tmp")
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(msgpack.packb({"format": SNAPSHOT_FORMAT, "catalog": self.catalog, "bundle": self.version,
                                   "unix": time.time()}))
            for k, v in arrays.items():      # one array per object: no second copy of the whole state
                f.write(msgpack.packb([k, v.dtype.str, list(v.shape), v.tobytes()]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._state_file)
        self.snapshots += 1

    def _load(self) -> None:
        """Fill the arrays from the state dir's snapshot over this catalog, if there is one."""
        if self._state_file is None or not self._state_file.exists():
            return
        try:
            with open(self._state_file, "rb") as f:
                objs = msgpack.Unpacker(f, max_buffer_size=0)
                head = next(objs)
                if head.get("format") != SNAPSHOT_FORMAT or head.get("catalog") != self.catalog:
                    raise ValueError(f"not a format {SNAPSHOT_FORMAT} snapshot over this catalog")
                got = {k: np.frombuffer(b, np.dtype(dt)).reshape(shape) for k, dt, shape, b in objs}
        except Exception:  # noqa: BLE001 - a broken snapshot must not keep the server down
            log.exception("%s unusable; starting from the bundle's state", self._state_file)
            return
        slots = got.pop("guest_slot")
        for k, v in got.items():
            if k in _GUEST:
                self.a[k][slots] = v
            else:
                self.a[k][...] = v
        log.info("feature state restored from %s (written %.0f s ago)", self._state_file, time.time() - head["unix"])

    def _snapshot_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.save()
            except OSError:
                log.exception("feature state snapshot to %s failed", self._state_file)

    def close(self) -> None:
        """Stop the snapshot thread and write a last snapshot: every process sharing the arrays
        does, so the last one to stop includes every event any of them acknowledged."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._state_file:
            try:
                self.save()
            except OSError:
                log.exception("last feature state snapshot to %s failed", self._state_file)

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
        return {"snapshots": self.snapshots}

    # -- writes (event path) ----------------------------------------------------------
    def apply(self, events: list[ResolvedEvent]) -> None:
        a = self.a
        with self._write_lock():
            for e in events:
                imp, pos = e.kind == "impression", e.kind == self.primary
                if imp:
                    a["item_n_imp"][e.item] += 1
                if pos:
                    a["item_n_pos"][e.item] += 1
                    a["item_hot"][e.item] += decay(e.t, self.t_ref, self.half_life)
                if not (imp or pos):
                    continue
                if e.user >= 0:
                    recent, seen = a["user_recent"][e.user], a["user_seen"][e.user]
                    n_imp, n_pos = a["user_n_imp"][e.user:e.user + 1], a["user_n_pos"][e.user:e.user + 1]
                else:
                    s = self._guest_slot(e.user_id, create=True)
                    if s < 0:
                        continue  # guest table full around this hash: no history, the items still counted
                    recent, seen = a["guest_recent"][s], a["guest_seen"][s]
                    n_imp, n_pos = a["guest_counts"][s, 0:1], a["guest_counts"][s, 1:2]
                if imp:
                    n_imp += 1
                    seen[1:] = seen[:-1]
                    seen[0] = e.item
                if pos:
                    n_pos += 1
                    recent[1:] = recent[:-1]
                    recent[0] = e.item
