"""recserve eval's baselines against brute-force versions on a small matrix."""
from __future__ import annotations

import numpy as np
import pytest

from model_export import baselines
from model_export.baselines import Baselines
from tests.test_movielens import make_raw, write_recbole
from model_export.movielens import load_movielens


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    raw = make_raw(n_users=30, n_items=45, n_ratings=700, seed=3)
    d = load_movielens(write_recbole(tmp_path_factory.mktemp("ml") / "rb", *raw))
    import dataclasses
    return dataclasses.replace(d, split="per_user", held_out=0.2)


def test_ndcg_against_a_loop():
    rng = np.random.default_rng(0)
    import scipy.sparse as sp
    s = rng.random((6, 30))
    excl = sp.csr_matrix(rng.random((6, 30)) < 0.2)
    pos = sp.csr_matrix((rng.random((6, 30)) < 0.25) & ~excl.toarray())
    want = []
    for u in range(6):
        order = [i for i in np.argsort(-s[u], kind="stable") if not excl[u, i]][:20]
        p = set(np.flatnonzero(pos[u].toarray()[0]))
        dcg = sum(1 / np.log2(r + 2) for r, i in enumerate(order) if i in p)
        idcg = sum(1 / np.log2(r + 2) for r in range(min(len(p), 20)))
        want.append(dcg / idcg)
    assert baselines.ndcg(s, excl, pos) == pytest.approx(np.mean(want))


def test_baseline_scores_brute_force(ds):
    rows = np.flatnonzero(ds.train_mask)
    tune_pos = ds.rank.rows[ds.log_labels[ds.rank.rows, 1] > 0]
    b = Baselines.fit(ds, rows, ds.history_rows, tune_pos)
    x = np.zeros((ds.n_users, ds.n_items))
    x[ds.log_user[rows], ds.log_item[rows]] = 1.0
    users = np.arange(ds.n_users)
    got = b.scores(users)
    # popularity: users per item
    np.testing.assert_allclose(got["popularity"][0], x.sum(0))
    # ItemKNN: sum over the user's items j of cos(i, j), i != j
    n = np.sqrt(x.sum(0))
    for u in users[:8]:
        want = np.zeros(ds.n_items)
        for i in range(ds.n_items):
            for j in np.flatnonzero(x[u]):
                if i != j and n[i] and n[j]:
                    want[i] += (x[:, i] @ x[:, j]) / (n[i] * n[j])
        np.testing.assert_allclose(got["itemknn"][u], want, atol=1e-5)
    # EASE: per item, ridge regression on the other items (over the items EASE covers)
    lam, cover = b.info["ease"]["lambda"], b.ease_items
    xc = x[:, cover]
    bb = np.zeros((cover.size, cover.size))
    for j in range(cover.size):
        o = np.delete(np.arange(cover.size), j)
        bb[o, j] = np.linalg.solve(xc[:, o].T @ xc[:, o] + lam * np.eye(o.size), xc[:, o].T @ xc[:, j])
    np.testing.assert_allclose(got["ease"][:, cover], xc @ bb, atol=1e-4)
    assert np.isneginf(np.delete(got["ease"], cover, axis=1)).all()


def test_lambda_is_the_best_of_the_grid_on_the_validation_slice(ds):
    tune_pos = ds.rank.rows[ds.log_labels[ds.rank.rows, 1] > 0]
    b = Baselines.fit(ds, np.flatnonzero(ds.train_mask), ds.history_rows, tune_pos)
    grid = b.info["ease"]["tuning_ndcg@20"]
    assert set(grid) == {str(lam) for lam in baselines.LAMBDAS}
    assert b.info["ease"]["lambda"] == float(max(grid, key=grid.get))
    assert b.info["ease"]["all_items"]
