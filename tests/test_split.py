"""The two splits, and the per-user protocol end to end on a small MovieLens-format log: the
store a held-out user is served from is the training rows before their cut (replayed as events,
walked offline and snapshotted alike), and offline recall returns what the engine recalls."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.core.bundle import load_bundle
from engine.core.config import load_config
from engine.core.sections import DataConfig
from engine.core.runner import Engine
from engine.core.state import snapshot
from engine.store.embedded import EmbeddedStore
from model_export import cascade
from model_export.build import build_bundle
from model_export.data import load_dataset
from model_export.evaluate import _Replay, evaluate
from model_export.movielens import load_movielens
from tests.test_movielens import make_raw, write_recbole

CONFIG = """
[data]
source = "movielens"
movielens_dir = "{dir}"
split = "per_user"
held_out = 0.25

[train]
embed_dim = 8
id_dim = 8
recent_len = 10
tt_epochs = 2
gbdt_trees = 10
gbdt_leaves = 4
dnn_hidden = [16]
dnn_epochs = 1
fine_experts = 2
fine_expert_hidden = [16]
fine_tower_hidden = [8]
fine_epochs = 1

[i2i]
neighbours = 10

[index]
kind = "flat"
recall_k = 20
recall_queries = 10

[serving]
max_count = 20
seen_window = 200
hot_half_life_hours = 240.0

[pipeline]
recall = ["i2i", "ann", "hot", "cold_start"]
stages = ["drop_excluded", "drop_seen", "drop_blocked", "coarse_trees", "coarse_dnn", "fine", "rerank"]

[stage.i2i]
kind = "recall_i2i"
k = 15

[stage.ann]
kind = "recall_ann"
k = 15
inline = true             # no route is abandoned for time: offline recall is compared with it

[stage.hot]
kind = "recall_hot"
k = 15

[stage.cold_start]
kind = "recall_cold_start"
k = 5
max_age_days = 20.0

[stage.drop_excluded]
kind = "filter"
rule = "excluded"

[stage.drop_seen]
kind = "filter"
rule = "seen"

[stage.drop_blocked]
kind = "filter"
rule = "blocked"

[stage.coarse_trees]
kind = "rank_trees"
keep = 30

[stage.coarse_dnn]
kind = "rank_dnn"
keep = 20

[stage.fine]
kind = "rank_multitask"

[stage.rerank]
kind = "rerank_beam"
weights = {{ click = 0.5, like = 0.5 }}
beam_width = 1
pool = 20
"""


@pytest.fixture(scope="module")
def ml_dir(tmp_path_factory):
    return write_recbole(tmp_path_factory.mktemp("ml") / "rb", *make_raw(n_users=40, n_items=120, n_ratings=2500,
                                                                            seed=4))


def _ds(ml_dir, split: str, held_out: float = 0.25):
    return load_dataset(DataConfig(source="movielens", movielens_dir=str(ml_dir), split=split, held_out=held_out))


def test_per_user_split(ml_dir):
    ds = _ds(ml_dir, "per_user")
    n = len(ds.log_user)
    parts = np.concatenate([ds.history_rows, ds.rank.rows, ds.valid.rows])
    assert np.array_equal(np.sort(parts), np.arange(n))                   # a partition of the log
    assert not ds.train_mask[ds.valid.rows].any() and ds.train_mask.sum() == n - ds.valid.rows.size
    for u in range(ds.n_users):
        mine = np.flatnonzero(ds.log_user == u)                            # log (time) order
        held = mine[-int(max(np.rint(0.25 * mine.size), 1)):] if mine.size > 1 else mine[:0]
        assert np.array_equal(np.intersect1d(mine, ds.valid.rows), held), u
        train = np.setdiff1d(mine, held)
        rank = train[-int(max(np.rint(0.25 * train.size), 1)):] if train.size > 1 else train[:0]
        assert np.array_equal(np.intersect1d(mine, ds.rank.rows), rank), u
        if held.size:
            assert ds.valid.cut[u] == held[0] and ds.valid.now[u] == pytest.approx(ds.log_time[held[0]])
        else:
            assert u not in ds.valid.users
    assert ds.implicit and ds.tasks == ("click", "like") and (ds.log_labels[:, 0] == 1).all()


def test_global_split_is_the_time_windows(ml_dir):
    ds = _ds(ml_dir, "global")
    assert np.array_equal(ds.history_rows, ds.window(0, ds.t_history))
    assert np.array_equal(ds.rank.rows, ds.window(ds.t_history, ds.t_valid))
    assert np.array_equal(ds.valid.rows, ds.window(ds.t_valid, np.inf))
    assert (ds.valid.cut[ds.valid.users] == ds.valid.rows[0]).all() and (ds.valid.now == ds.t_valid).all()


def test_split_i2i_and_implicit_keys_are_checked():
    from engine.core.sections import I2IConfig, ImplicitConfig
    from engine.core.errors import ConfigError
    for cfg, match in ((DataConfig(split="per_user"), "per_user needs a source without ground truth"),
                       (DataConfig(source="movielens", split="by_item"), "split"),
                       (DataConfig(source="movielens", split="per_user", held_out=1.0), "held_out"),
                       (I2IConfig(method="swing"), "method"), (I2IConfig(decay=0.0), "decay"),
                       (I2IConfig(neighbours=-1), "neighbours"),
                       (ImplicitConfig(candidates=0.0), "no negatives"), (ImplicitConfig(uniform=-1), "uniform"),
                       (ImplicitConfig(positives="some"), "positives")):
        with pytest.raises(ConfigError, match=match):
            cfg.check()
    DataConfig(source="movielens", split="per_user", held_out=0.3).check()
    ImplicitConfig(candidates=0.0, uniform=20.0, positives="all").check()


def test_cold_views_are_refused_on_data_without_impressions(ml_dir, tmp_path):
    from engine.core.errors import ConfigError
    (tmp_path / "ml.toml").write_text(CONFIG.format(dir=ml_dir).replace("[train]\n", "[train]\nrank_cold_share = 0.2\n"))
    with pytest.raises(ConfigError, match="rank_cold_share"):
        build_bundle(load_config(tmp_path / "ml.toml"), tmp_path / "bundles")


@pytest.fixture(scope="module")
def small_bundle(ml_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    (d / "ml.toml").write_text(CONFIG.format(dir=ml_dir))
    cfg = load_config(d / "ml.toml")
    return build_bundle(cfg, tmp_path_factory.mktemp("bundles") / "ml"), cfg


@pytest.mark.slow
def test_per_user_eval_serves_each_user_from_their_cut(small_bundle):
    vdir, cfg = small_bundle
    report = evaluate(vdir, n_users=0)
    p = report["protocol"]
    assert p["split"] == "per_user" and p["faulty_responses"] == 0 and p["clock_days"][0] < p["clock_days"][1]
    assert {"served", "ranker", "popularity", "itemknn", "ease", "random"} == set(report["lists"])
    assert "recall@20" in report["lists"]["served"] and len(report["verdict"]) == 6


@pytest.mark.slow
def test_replay_walk_and_snapshot_agree_at_each_cut(small_bundle):
    """The eval's store (training rows replayed as events) == cascade.walk's offline state ==
    the snapshot of the training rows before the cut; and offline recall == the engine's."""
    vdir, cfg = small_bundle
    bundle = load_bundle(vdir)
    ds = load_dataset(cfg.data)
    m = bundle.manifest
    L, S, hl = m["schema"]["recent_len"], m["schema"]["seen_len"], m["state"]["half_life_days"]
    empty = snapshot(ds.log_user[:0], ds.log_item[:0], ds.log_time[:0], ds.log_labels[:0, 0], ds.n_users,
                     ds.n_items, 0.0, L, S, hl)
    store = EmbeddedStore(dataclasses.replace(bundle, state=empty))
    store.clock = cascade.StoppedClock(0.0)
    engine = Engine(cfg, dataclasses.replace(bundle, state=empty), store=store)
    try:
        replay = _Replay(engine, ds, bundle)
        users = ds.valid.users

        def user_emb(x):
            return engine.models.run("user_tower", {"x": x})
        recalled, states = cascade.recall(ds, cfg, bundle.tables, m["schema"], user_emb, ds.valid, users)
        checked = 0
        for g, u in ((g, u) for g in cascade.walk(ds, ds.valid, users, L, S, hl) for u in g.users.tolist()):
            cut, now = int(ds.valid.cut[u]), float(ds.valid.now[u])
            assert g.now == now
            replay.to(cut, now)
            r = np.flatnonzero(ds.train_mask[:cut])
            snap = snapshot(ds.log_user[r], ds.log_item[r], ds.log_time[r], ds.log_labels[r, 0], ds.n_users,
                            ds.n_items, np.nextafter(np.float32(now), np.float32(np.inf)), L, S, hl)
            f = store.user(str(ds.user_ids[u]), u, bundle.tables.default_profile, bundle.tables.user_profile)
            for src in (g.store.user(str(ds.user_ids[u]), u, bundle.tables.default_profile,
                                     bundle.tables.user_profile),):
                assert np.array_equal(f.recent, src.recent) and np.array_equal(f.seen, src.seen)
                assert (f.n_imp, f.n_pos) == (src.n_imp, src.n_pos)
            assert np.array_equal(f.recent[0], snap.user_recent[u]) and np.array_equal(f.seen, snap.user_seen[u])
            items = np.arange(ds.n_items, dtype=np.int32)
            a, b = store.item_stats(items), g.store.item_stats(items)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and np.array_equal(a[0], snap.item_n_imp)
            np.testing.assert_allclose(a[2], b[2], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(a[2], snap.item_hot, rtol=1e-4, atol=1e-7)
            # offline recall: the engine's candidates after its last filter
            seen_by_engine = {}
            engine.recommend(_request(ds, u, states), observer=lambda name, c: seen_by_engine.__setitem__(name, c))
            served = seen_by_engine["drop_blocked"]
            k = int(np.searchsorted(states.users, u))
            mine = recalled.row == k
            order = np.argsort(recalled.item[mine])
            assert np.array_equal(recalled.item[mine][order], np.sort(served.item)), u
            np.testing.assert_array_equal(recalled.routes[mine][order], served.routes[np.argsort(served.item)])
            checked += 1
        assert checked == users.size > 10
    finally:
        engine.close()


def _request(ds, u, states):
    from engine.core.request import Request
    k = int(np.searchsorted(states.users, u))
    return Request(str(ds.user_ids[u]), 10, dict(zip(ds.context_fields, states.context[k].tolist())),
                   deadline_ms=60_000)


def test_movielens_loader_keeps_the_split_fields(ml_dir):
    ds = load_movielens(ml_dir)
    assert ds.split == "global" and ds.implicit
