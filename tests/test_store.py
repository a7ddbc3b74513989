"""Feature store: offline/online consistency, and the embedded store's persistence.

Consistency: the training path folds the log into `snapshot(log, t)`; the serving path seeds a
store with `snapshot(log, t0)` for an earlier t0 and replays the log rows of [t0, t) as events.
Both must give the same model inputs (user tower, coarse features, fine-ranker sequence) for
the same (user, items). `check_replay` runs the serving path on any backend; test_store_redis.py
runs it on Redis.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import pytest

from engine.core import featurize, pages
from engine.core.bundle import Bundle, load_bundle
from engine.core.config import load_config
from model_export.cascade import StoppedClock
from engine.core.models import Models
from engine.core.state import snapshot
from engine.core.features import ResolvedEvent
from engine.store.embedded import EmbeddedStore
from model_export.data import load_dataset
from model_export.dataset import Dataset


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Bundle:
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def world(tiny_config) -> Dataset:
    return load_dataset(load_config(tiny_config).data)


@pytest.fixture(scope="module")
def models(bundle, tiny_config) -> Models:
    return Models(bundle, load_config(tiny_config).serving)


def _features(tables, models: Models, user: int, context: np.ndarray, items: np.ndarray, recent: np.ndarray,
              n_imp: float, n_pos: float, item_stats, now: float) -> dict[str, np.ndarray]:
    """The model inputs of one request, exactly as the engine and model_export.train build them."""
    x = featurize.user_tower_input(tables, np.array([user]), tables.user_profile[[user]], context, recent)
    user_e = models.run("user_tower", {"x": x})
    i2i = featurize.i2i_scores(tables.i2i, recent).lookup(items)
    coarse = featurize.coarse_features(tables, items, user_e, tables.item_emb[items], recent, np.float32(n_imp),
                                       np.float32(n_pos), *item_stats, context, now, i2i)
    seq, mask = featurize.sequence_input(tables, recent)
    return {"user_tower": x, "coarse": coarse, "seq": seq, "seq_mask": mask}


def check_replay(bundle: Bundle, ds: Dataset, models: Models, make_store: Callable[[Bundle], object]) -> None:
    """Serving state (store seeded at t0 + events of [t0, t)) == training state (snapshot at t)."""
    m = bundle.manifest
    L, S, hl = m["schema"]["recent_len"], m["schema"]["seen_len"], m["state"]["half_life_days"]
    t0, t = ds.t_valid, ds.t_end

    def state(at: float):
        return snapshot(ds.log_user, ds.log_item, ds.log_time, ds.log_labels[:, 0], ds.n_users, ds.n_items,
                        at, L, S, hl)

    train = state(t)
    assert np.array_equal(train.user_recent, bundle.state.user_recent)   # the bundle ships this very state
    seeded = dataclasses.replace(bundle, state=state(t0), manifest={**m, "version": f"{bundle.version}-at-{t0:g}"})
    store = make_store(seeded)
    try:
        store.clock = StoppedClock(t)   # hot scores decay to t, as the snapshot's do
        rows = ds.window(t0, t)
        events = []
        for r in rows.tolist():
            u, i, tm = int(ds.log_user[r]), int(ds.log_item[r]), float(ds.log_time[r])
            events.append(ResolvedEvent("impression", u, str(ds.user_ids[u]), i, tm))
            if ds.log_labels[r, 0]:
                events.append(ResolvedEvent(bundle.tasks[0], u, str(ds.user_ids[u]), i, tm))
        for lo in range(0, len(events), 1000):
            store.apply(events[lo:lo + 1000])
        t_ = bundle.tables

        users = np.unique(ds.log_user[rows])
        for u in users.tolist():
            f = store.user(str(ds.user_ids[u]), u, t_.default_profile, t_.user_profile)
            assert np.array_equal(f.recent[0], train.user_recent[u]), u
            assert np.array_equal(f.seen, train.user_seen[u]), u
            assert (f.n_imp, f.n_pos) == (train.user_n_imp[u], train.user_n_pos[u]), u
        imp, pos, hot = store.item_stats(np.arange(ds.n_items, dtype=np.int32))
        assert np.array_equal(imp, train.item_n_imp) and np.array_equal(pos, train.item_n_pos)
        np.testing.assert_allclose(hot, train.item_hot, rtol=1e-5, atol=1e-9)

        rng = np.random.default_rng(3)
        busiest = users[np.argsort(-np.bincount(ds.log_user[rows])[users], kind="stable")[:10]]
        for u in busiest.tolist():
            mine = rows[ds.log_user[rows] == u]
            items = np.unique(np.r_[ds.log_item[mine], rng.integers(0, ds.n_items, 50)]).astype(np.int32)
            context = ds.log_context[mine[-1]][None]
            f = store.user(str(ds.user_ids[u]), u, t_.default_profile, t_.user_profile)
            serving = _features(t_, models, u, context, items, f.recent, f.n_imp, f.n_pos,
                                store.item_stats(items), t)
            training = _features(t_, models, u, context, items, train.user_recent[[u]], train.user_n_imp[u],
                                 train.user_n_pos[u], (train.item_n_imp[items], train.item_n_pos[items],
                                                       train.item_hot[items]), t)
            for k in serving:
                np.testing.assert_allclose(serving[k], training[k], rtol=1e-5, atol=1e-6, err_msg=f"{k} user {u}")
    finally:
        store.close()


def test_serving_features_equal_training_features(bundle, world, models):
    check_replay(bundle, world, models, EmbeddedStore)


def _events(bundle: Bundle, t: float) -> list[ResolvedEvent]:
    return [ResolvedEvent("impression", 3, str(bundle.user_ids[3]), 42, t),
            ResolvedEvent(bundle.tasks[0], 3, str(bundle.user_ids[3]), 42, t),
            ResolvedEvent("impression", -1, "guest-1", 7, t),
            ResolvedEvent(bundle.tasks[0], -1, "guest-1", 8, t)]


def _same_state(a: EmbeddedStore, b: EmbeddedStore) -> bool:
    return all(np.array_equal(a.a[k], b.a[k]) for k in a.a)


def test_snapshot_round_trip(bundle, tmp_path):
    s = EmbeddedStore(bundle, state_dir=tmp_path)
    s.apply(_events(bundle, s.clock.days()))
    s.close()                                            # writes the last snapshot
    again = EmbeddedStore(bundle, state_dir=tmp_path)
    assert _same_state(s, again)
    guest = again.user("guest-1", -1, bundle.tables.default_profile, bundle.tables.user_profile)
    assert guest.seen[0] == 7 and guest.recent[0, 0] == 8 and (guest.n_imp, guest.n_pos) == (1, 1)
    assert again.user(str(bundle.user_ids[3]), 3, bundle.tables.default_profile,
                      bundle.tables.user_profile).recent[0, 0] == 42
    again.close()
    model_update = dataclasses.replace(bundle, manifest={**bundle.manifest, "version": "a-newer-model"})
    kept = EmbeddedStore(model_update, state_dir=tmp_path)   # same catalog: live events survive
    assert _same_state(s, kept)
    files = {**bundle.manifest["files"], "tables/item_ids.npy": {"sha256": "another-catalog", "bytes": 0}}
    other = dataclasses.replace(bundle, manifest={**bundle.manifest, "files": files})
    fresh = EmbeddedStore(other, state_dir=tmp_path)         # another catalog: its own state
    assert np.array_equal(fresh.a["item_n_imp"], bundle.state.item_n_imp)
    for st in (kept, fresh):
        st.close()


def test_shared_arrays_are_kept_per_catalog(bundle, tmp_path):
    """Without persistence: a worker (re)started on a newer model bundle over the same catalog
    joins the live state in the shared folder instead of resetting it for every worker; a
    bundle over another catalog gets its own arrays and leaves the old ones, which a store
    still finishing requests has mapped, as they are."""
    live = EmbeddedStore(bundle, tmp_path / "shm")
    live.apply(_events(bundle, live.clock.days()))
    before = {k: np.array(v) for k, v in live.a.items()}
    newer = EmbeddedStore(dataclasses.replace(bundle, manifest={**bundle.manifest, "version": "a-newer-model"}),
                          tmp_path / "shm")
    assert _same_state(live, newer) and before["item_n_imp"][42] == bundle.state.item_n_imp[42] + 1
    files = {**bundle.manifest["files"], "tables/item_ids.npy": {"sha256": "another-catalog", "bytes": 0}}
    other = EmbeddedStore(dataclasses.replace(bundle, manifest={**bundle.manifest, "files": files}),
                          tmp_path / "shm")
    assert np.array_equal(other.a["item_n_imp"], bundle.state.item_n_imp)
    assert all(np.array_equal(live.a[k], before[k]) for k in before)
    for st in (live, newer, other):
        st.close()


def test_snapshot_on_interval_and_into_shared_arrays(bundle, tmp_path):
    """Only the writer snapshots periodically; a fresh shared dir (a restarted server) reloads.
    (Restarts without close(): tests/test_store_durability.py.)"""
    state_dir = tmp_path / "state"
    writer = EmbeddedStore(bundle, tmp_path / "shm1", state_dir, snapshot_s=0.05, snapshot_writer=True)
    reader = EmbeddedStore(bundle, tmp_path / "shm1", state_dir, snapshot_s=0.05, snapshot_writer=False)
    reader.apply(_events(bundle, reader.clock.days()))   # shared arrays: the writer's snapshot has it
    time.sleep(0.3)
    assert writer.snapshots > 0 and reader.snapshots == 0
    for st in (reader, writer):
        st.close()
    restarted = EmbeddedStore(bundle, tmp_path / "shm2", state_dir)
    assert _same_state(writer, restarted)
    restarted.close()


@pytest.mark.slow
def test_events_survive_a_clean_restart(tiny_bundle, tiny_config, tmp_path):
    from test_server import Server   # the real `recserve serve` subprocess helper

    args = ("--state-dir", str(tmp_path / "state"))
    hidden: dict[str, list[str]] = {}
    server = Server(tmp_path, tiny_config, tiny_bundle, workers=2, extra=args)
    try:
        with server.client() as c:
            for user in ("u5", "guest-persist"):
                served = [it.item_id for it in c.recommend(user, count=10).items]
                hidden[user] = [x for x in served if x != "i10"][:5]   # i10 is pinned to the final list
                assert c.report_events([{"kind": "impression", "user_id": user, "item_id": x}
                                        for x in hidden[user]]).accepted == 5
    finally:
        assert server.terminate() == 0
    server = Server(tmp_path, tiny_config, tiny_bundle, workers=2, extra=args)
    try:
        with server.client() as c:
            for user, items in hidden.items():
                assert not set(items) & {it.item_id for it in c.recommend(user, count=10).items}, user
    finally:
        assert server.terminate() == 0


def _resident_kb(path) -> int:
    """This process's resident kB of the mappings of `path` (/proc/self/smaps)."""
    kb, inside = 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            kb += int(line.split()[1])
    return kb


def test_pages_drop_and_populate_a_file_backed_array(tmp_path):
    path = tmp_path / "state.npy"
    np.save(path, np.arange(8 << 20, dtype=np.int32))          # 32 MB
    a = np.asarray(np.load(path, mmap_mode="r"))              # a plain view, as load_bundle gives
    assert _resident_kb(path) < 1_000                          # nothing read yet
    pages.populate(a)                                          # a server maps its tables whole
    assert _resident_kb(path) > 30_000
    total = int(a.sum(dtype=np.int64))
    pages.drop(a)                                              # the store's copy read it once
    assert _resident_kb(path) < 1_000
    assert int(a.sum(dtype=np.int64)) == total                 # still readable, from the page cache
    pages.drop(np.zeros(3))                                    # in-memory arrays: nothing to do
    pages.populate(np.zeros(3))
