"""The item-to-item table and scores against direct dense computations on a small matrix."""
from __future__ import annotations

import numpy as np
import pytest

from engine.core.sections import I2IConfig
from engine.core.featurize import i2i_pairs, i2i_scores
from model_export import i2i

N_USERS, N_ITEMS = 40, 25


@pytest.fixture(scope="module")
def log():
    rng = np.random.default_rng(5)
    users = rng.integers(0, N_USERS, 400)
    items = rng.integers(0, N_ITEMS - 2, 400)          # the last two items: never interacted with
    return users, items


def dense_x(users, items) -> np.ndarray:
    x = np.zeros((N_USERS, N_ITEMS))
    x[users, items] = 1.0
    return x


def test_ease_is_the_ridge_regression_of_each_item_on_the_others(log):
    """B[:, j] minimises ||X_j - X_{-j} b||^2 + lambda ||b||^2 with b_j = 0: solved item by item."""
    x, lam = dense_x(*log), 7.0
    b = i2i.ease(i2i.interactions(*log, N_USERS, N_ITEMS), lam)
    for j in range(N_ITEMS):
        others = np.delete(np.arange(N_ITEMS), j)
        a = x[:, others]
        want = np.linalg.solve(a.T @ a + lam * np.eye(N_ITEMS - 1), a.T @ x[:, j])
        np.testing.assert_allclose(b[others, j], want, atol=1e-9)
        assert b[j, j] == 0


def test_cosine_matches_the_dense_formula(log):
    x = dense_x(*log)
    got = i2i.cosine(i2i.interactions(*log, N_USERS, N_ITEMS)).toarray()
    norm = np.sqrt(x.sum(0))
    want = (x.T @ x) / np.maximum(np.outer(norm, norm), 1e-12)
    np.fill_diagonal(want, 0)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("method", ["ease", "cosine"])
@pytest.mark.parametrize("k", [3, 8, N_ITEMS])
def test_table_keeps_each_rows_k_largest_abs_weights(log, method, k):
    x = i2i.interactions(*log, N_USERS, N_ITEMS)
    w = i2i.ease(x, 5.0) if method == "ease" else i2i.cosine(x).toarray()
    table = i2i.top_k(w if method == "ease" else i2i.cosine(x), k, 0.9)
    assert table.indptr.dtype == np.int64 and table.indices.dtype == np.int32 and table.weights.dtype == np.float32
    for j in range(N_ITEMS):
        cols = table.indices[table.indptr[j]:table.indptr[j + 1]]
        vals = table.weights[table.indptr[j]:table.indptr[j + 1]]
        nonzero = np.flatnonzero(w[j])
        assert cols.size == min(k, nonzero.size) and np.all(np.diff(cols) > 0)
        np.testing.assert_allclose(vals, w[j, cols], rtol=1e-6)
        if cols.size < nonzero.size:   # nothing left out weighs more than what was kept
            assert np.abs(np.delete(w[j], cols)).max() <= np.abs(vals).min() + 1e-12


def test_user_scores_are_the_recency_weighted_sum_of_neighbour_rows(log):
    x = i2i.interactions(*log, N_USERS, N_ITEMS)
    table = i2i.top_k(i2i.ease(x, 5.0), 6, 0.8)
    dense = np.zeros((N_ITEMS, N_ITEMS), np.float32)
    for j in range(N_ITEMS):
        sl = slice(table.indptr[j], table.indptr[j + 1])
        dense[j, table.indices[sl]] = table.weights[sl]
    recent = np.array([[3, 7, 3, -1, -1], [-1, -1, -1, -1, -1], [N_ITEMS - 1, 0, 1, 2, 4]], np.int32)
    want = np.zeros((3, N_ITEMS), np.float32)
    for b in range(3):
        for r, j in enumerate(recent[b]):
            if j >= 0:
                want[b] += 0.8 ** r * dense[j]
    scores = i2i_scores(table, recent)
    rows, items = np.divmod(scores.keys, N_ITEMS)
    got = np.zeros_like(want)
    got[rows, items] = scores.scores
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.isin(1, rows)                          # a user without history has no scores
    all_items = np.tile(np.arange(N_ITEMS), 3)
    all_rows = np.repeat(np.arange(3), N_ITEMS)
    np.testing.assert_allclose(scores.lookup(all_items, all_rows), want.ravel(), atol=1e-6)
    np.testing.assert_allclose(i2i_pairs(table, recent, all_rows, all_items), want.ravel(), atol=1e-6)
    one = i2i_scores(table, recent[:1])
    items, s = one.top(4)
    assert list(items) == list(np.argsort(-want[0], kind="stable")[:4]) and np.all(s > 0)
    np.testing.assert_allclose(s, np.sort(want[0])[::-1][:4], atol=1e-6)


def test_i2i_pairs_blocks_agree_with_one_block(log, monkeypatch):
    x = i2i.interactions(*log, N_USERS, N_ITEMS)
    table = i2i.top_k(i2i.cosine(x), 5, 0.95)
    rng = np.random.default_rng(1)
    recent = rng.integers(-1, N_ITEMS, (N_USERS, 6)).astype(np.int32)
    rows, items = rng.integers(0, N_USERS, 500), rng.integers(0, N_ITEMS, 500)
    whole = i2i_pairs(table, recent, rows, items)
    monkeypatch.setattr("engine.core.featurize.I2I_CHUNK", 7)       # one user per block
    np.testing.assert_allclose(i2i_pairs(table, recent, rows, items), whole, atol=1e-6)
    assert np.count_nonzero(whole) > 50


def test_build_table_picks_the_method_by_catalog_size(log):
    users, items = log
    table, meta = i2i.build_table(I2IConfig(neighbours=4, ease_max_items=N_ITEMS), users, items, N_USERS, N_ITEMS)
    assert meta["method"] == "ease" and meta["lambda"] == 300.0 and table.decay == 0.95
    _, meta = i2i.build_table(I2IConfig(neighbours=4, ease_max_items=N_ITEMS - 1), users, items, N_USERS, N_ITEMS)
    assert meta["method"] == "cosine"
    assert np.diff(table.indptr).max() == 4 and np.diff(table.indptr)[-2:].sum() == 0   # never-seen items: no row


@pytest.mark.slow
def test_recall_i2i_route_follows_the_users_clicks(tiny_bundle, tiny_config):
    """A new user has no i2i candidates; one reported click makes the route return that item's
    neighbours (the table's row, best first), and the rankers' i2i feature reads the same scores."""
    from engine.core.bundle import load_bundle
    from engine.core.config import apply_overrides, load_config, parse_config
    from engine.core.request import Event, Request
    from engine.core.runner import Engine
    from engine.store.embedded import EmbeddedStore

    base = load_config(tiny_config)
    raw = apply_overrides(base.raw, {"stage.i2i": {"kind": "recall_i2i", "k": 50},
                                     "pipeline.recall": ["i2i", *base.pipeline.recall]}, "test")
    cfg = parse_config(raw, base.path)
    bundle = load_bundle(tiny_bundle)
    engine = Engine(cfg, bundle, store=EmbeddedStore(bundle))
    try:
        table = bundle.tables.i2i
        item = int(np.argmax(np.diff(table.indptr)))           # an item with a full neighbour row
        req = Request("guest-i2i", 10, deadline_ms=10_000)
        first = engine.recommend(req)
        assert next(s for s in first.trace if s.name == "i2i").count_out == 0
        assert engine.report_events([Event("click", "guest-i2i", str(bundle.item_ids[item]), 0.0)])[0] == 1
        ctx = engine.hydrate(req)
        items, scores = ctx.i2i.top(50)
        row = slice(table.indptr[item], table.indptr[item + 1])
        weight = dict(zip(table.indices[row].tolist(), table.weights[row].tolist()))
        assert items.size == min(50, sum(w > 0 for w in weight.values()))
        np.testing.assert_allclose(scores, [weight[i] for i in items.tolist()], rtol=1e-6)   # the clicked row
        np.testing.assert_allclose(scores, sorted(weight.values(), reverse=True)[:items.size], rtol=1e-6)
        seen = {}
        engine.recommend(req, observer=lambda name, c: seen.__setitem__(name, c))
        assert next(s for s in engine.recommend(req).trace if s.name == "i2i").count_out == items.size
        merged = seen["coarse_trees"]
        x = merged.feats["coarse_x"][:, list(bundle.manifest["schema"]["coarse_features"]).index("i2i_score")]
        np.testing.assert_allclose(x, ctx.i2i.lookup(merged.item), rtol=1e-6)
        assert (x > 0).sum() > 0
    finally:
        engine.close()
