import itertools
from types import SimpleNamespace

import numpy as np

import pytest

from engine.core.candidates import Candidates, Guarantee, found_in, merge, top_k
from engine.core.featurize import _share
from stages.filter import Filter, Params as FilterParams, _author_then_score
from stages.rerank_beam import beam_search, fuse


def test_merge_ors_routes_keeps_best_score_and_max_guarantee():
    a = Candidates.from_route(np.array([1, 2, 3]), np.array([0.1, 0.5, 0.3]), 1)
    b = Candidates.from_route(np.array([3, 4]), np.array([0.9, 0.2]), 2, Guarantee.FINE)
    m = merge([a, b])
    assert m.item.tolist() == [1, 2, 3, 4]
    assert m.routes.tolist() == [1, 1, 3, 2]
    assert np.allclose(m.scores["recall"], [0.1, 0.5, 0.9, 0.2])
    assert m.guaranteed.tolist() == [0, 0, Guarantee.FINE, Guarantee.FINE]


def test_keep_top_protects_guaranteed_items_to_their_level():
    c = Candidates.from_route(np.arange(10), np.zeros(10), 1)
    c.guaranteed[9] = Guarantee.COARSE
    score = np.arange(10, dtype=np.float32)[::-1].copy()   # item 9 is the worst
    top = c.keep_top(score, 3, Guarantee.COARSE)
    assert top.item.tolist() == [0, 1, 9]   # pinned items take slots: the next stage's batch stays bounded
    assert c.keep_top(score, 3, Guarantee.FINE).item.tolist() == [0, 1, 2]
    c.guaranteed[5:] = Guarantee.COARSE                   # more pinned than `keep`: all of them survive
    assert c.keep_top(score, 3, Guarantee.COARSE).item.tolist() == [5, 6, 7, 8, 9]


def test_the_author_cap_key_sorts_as_lexsort_by_author_then_descending_score():
    rng = np.random.default_rng(0)
    for n in (1, 7, 500, 3000):
        author = rng.integers(-1, 40, n).astype(np.int32)
        score = rng.normal(size=n).astype(np.float32)
        score[rng.integers(0, n, n // 4 + 1)] = 0.0
        score[rng.integers(0, n, n // 8 + 1)] = -0.0       # ties with 0.0, as in lexsort
        score[rng.integers(0, n, 2)] = [np.inf, -np.inf]
        score = np.where(rng.random(n) < 0.2, score[rng.integers(0, n, n)], score)   # more ties
        want = np.lexsort((-score, author))
        assert np.array_equal(np.argsort(_author_then_score(author, score), kind="stable"), want)


@pytest.mark.parametrize("cap", [1, 3, 40, 1000])
def test_the_author_cap_keeps_each_authors_best_by_recall_and_every_guaranteed_item(cap):
    rng = np.random.default_rng(cap)
    author = rng.integers(0, 30, 5000).astype(np.int32)
    env = SimpleNamespace(bundle=SimpleNamespace(tables=SimpleNamespace(item_author=author)))
    f = Filter(FilterParams(rule="author_cap", max_per_author=cap), env)
    items = rng.choice(5000, 600, replace=False)
    c = Candidates.from_route(items, rng.permutation(600).astype(np.float32), 1)   # no ties
    c.guaranteed[rng.integers(0, 600, 8)] = Guarantee.COARSE
    want = {int(i) for i, s, g in zip(items, c.scores["recall"], c.guaranteed)
            if g >= Guarantee.COARSE or (c.scores["recall"][author[items] == author[i]] > s).sum() < cap}
    got = f(None, c)
    assert set(got.item.tolist()) == want and len(got) == len(want)
    assert np.array_equal(got.scores["recall"], c.scores["recall"][np.isin(items, got.item)])   # order kept


def test_found_in_agrees_with_isin():
    rng = np.random.default_rng(3)
    for n, m in ((2500, 250), (10, 0), (0, 5), (300, 300), (50, 3)):
        a, b = rng.integers(0, 400, n).astype(np.int32), rng.integers(0, 400, m).astype(np.int32)
        assert np.array_equal(found_in(a, b), np.isin(a, b))


def test_one_users_category_counts_by_lookup_equal_the_pairwise_comparison():
    rng = np.random.default_rng(1)
    for k in (0, 1, 20):
        recent = rng.integers(0, 12, k)
        codes = rng.integers(0, 15, 400)
        assert np.array_equal(_share(recent, codes), (recent[None, :] == codes[:, None]).sum(1))


@pytest.mark.parametrize("n, k", [(73_547, 240), (100_000, 1), (20_000, 300), (500, 499), (10, 10), (10, 0)])
def test_top_k_is_exactly_the_k_largest(n, k):
    rng = np.random.default_rng(n + k)
    for score in (rng.standard_normal(n).astype(np.float32),          # the sampled threshold path
                  np.repeat(rng.standard_normal(n // 50 + 1), 50)[:n].astype(np.float32),  # heavy ties
                  np.sort(rng.standard_normal(n)).astype(np.float32)):  # sorted: the sample sees a ramp
        got = top_k(score, k)
        assert got.size == min(k, n) and np.unique(got).size == got.size
        if k and k < n:    # the k-th largest value bounds the pick; ties may be broken either way
            kth = np.sort(score)[n - k]
            assert (score[got] >= kth).all() and (score >= kth).sum() >= k
            assert np.isclose(np.sort(score[got]).sum(), np.sort(score)[n - k:].sum())


def test_take_keeps_feature_columns_aligned():
    c = Candidates.from_route(np.arange(5), np.zeros(5), 1).with_columns(
        {"s": np.arange(5)}, {"x": np.arange(10).reshape(5, 2)}, primary="s")
    t = c.take(np.array([4, 0]))
    assert t.feats["x"].tolist() == [[8, 9], [0, 1]] and t.primary == "s"


def test_beam_width_one_without_penalties_is_a_sort():
    rng = np.random.default_rng(0)
    for _ in range(20):
        fused = rng.random(80).astype(np.float32)
        cat, auth = rng.integers(0, 5, 80), rng.integers(0, 9, 80)
        order, _ = beam_search(fused, cat, auth, 20, width=1)
        assert order.tolist() == np.argsort(-fused, kind="stable")[:20].tolist()


def test_wider_beam_never_finds_a_worse_list_and_penalties_diversify():
    rng = np.random.default_rng(1)
    fused = rng.random(60)
    cat, auth = rng.integers(0, 4, 60), rng.integers(0, 30, 60)
    rewards = [beam_search(fused, cat, auth, 10, w, 0.3, 0.1, 0.05)[1] for w in (1, 4, 16)]
    assert rewards[0] <= rewards[1] + 1e-9 and rewards[1] <= rewards[2] + 1e-9
    plain, _ = beam_search(fused, cat, auth, 10, 4)
    diverse, _ = beam_search(fused, cat, auth, 10, 4, category_penalty=1.0)
    same_adjacent = lambda o: int((cat[o][1:] == cat[o][:-1]).sum())
    assert same_adjacent(diverse) <= same_adjacent(plain)
    assert same_adjacent(diverse) == 0


def test_beam_reward_is_the_objective_of_its_list():
    """Against the objective itself, scored by hand: the reward returned is its list's, and no
    ordered list of 3 of the 6 items scores more."""
    rng = np.random.default_rng(2)
    for _ in range(30):
        fused = rng.random(6)
        cat, auth = rng.integers(0, 3, 6), rng.integers(0, 3, 6)
        pens = tuple(float(x) for x in rng.choice([0.0, 0.2, 0.6], 3))

        def reward(o):
            r = sum(fused[j] / np.log2(s + 2) for s, j in enumerate(o))
            r -= sum(pens[0] * (cat[a] == cat[b]) + pens[1] * (auth[a] == auth[b]) for a, b in zip(o, o[1:]))
            return r + pens[2] * len({int(cat[j]) for j in o})

        best = max(reward(o) for o in itertools.permutations(range(6), 3))
        order, got = beam_search(fused, cat, auth, 3, 4, *pens)
        assert abs(reward(tuple(order)) - got) < 1e-9 and got <= best + 1e-9


def test_beam_ties_go_to_the_earlier_item():
    order, _ = beam_search(np.full(30, 0.5, np.float32), np.zeros(30), np.arange(30), 10, width=3)
    assert order.tolist() == list(range(10))


def test_fusion_product_and_sum():
    s = {"click": np.array([0.5, 0.1]), "like": np.array([0.1, 0.5])}
    p = fuse(s, {"click": 1.0, "like": 0.5}, "product", 1e-3)
    assert np.allclose(p, (s["click"] + 1e-3) * (s["like"] + 1e-3) ** 0.5, rtol=1e-5)
    assert np.allclose(fuse(s, {"click": 2.0}, "sum", 1e-3), [1.0, 0.2])
