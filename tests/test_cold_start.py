"""The cold-start route's pool partitioned by IVF lists (`nprobe`), on the real tiny bundle with
a real IVF index over its item embeddings in place of its flat one."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.core.bundle import load_bundle
from engine.core.config import load_config
from engine.core.registry import StageEnv
from engine.core.runner import Engine
from engine.store.embedded import EmbeddedStore
from indexes.faiss_index import build_index
from stages.recall_cold_start import RecallColdStart

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def routes(tiny_config, tiny_bundle):
    """The tiny pipeline's cold-start route, and the same route partitioned by a 16-list IVF."""
    bundle = load_bundle(tiny_bundle)
    engine = Engine(load_config(tiny_config), bundle, make_store=EmbeddedStore)
    live = engine._live
    exact = next(s.fn for s in live.pipelines[""].recall if s.name == "cold_start")
    live.models.index = build_index(np.asarray(bundle.tables.item_emb), "ivf_flat", nlist=16, nprobe=4)

    def partitioned(nprobe: int) -> RecallColdStart:
        env = StageEnv("cold_start", bundle, live.models, live.store, load_config(tiny_config), route_bit=exact.bit)
        return RecallColdStart(dataclasses.replace(exact.p, nprobe=nprobe), env)

    yield exact, partitioned, np.asarray(bundle.tables.item_emb)
    engine.close()


def test_scoring_every_list_matches_the_whole_pool(routes):
    exact, partitioned, _ = routes
    whole = partitioned(16)
    pool, emb, _ = exact._snap
    assert pool.size > 50, "the tiny world has a young pool to match against"
    u = np.random.default_rng(0).standard_normal(emb.shape[1]).astype(np.float32)
    k = 40
    want, want_s = exact._match(emb, None, u, k)
    p2, e2, starts = whole._snap
    got, got_s = whole._match(e2, starts, u, k)
    assert set(pool[want]) == set(p2[got])
    assert np.allclose(np.sort(want_s), np.sort(got_s), atol=1e-5)
    whole.close()


def test_few_lists_score_exactly_the_pool_items_in_the_lists_nearest_the_user(routes):
    _, partitioned, item_emb = routes
    route = partitioned(3)
    pool, emb, starts = route._snap
    assert np.array_equal(emb, item_emb[pool])                      # rows follow the pool's order
    lists = np.argmax(emb @ route.centroids.T, axis=1)
    assert np.all(np.diff(lists) >= 0) and np.array_equal(starts, np.searchsorted(lists, np.arange(17)))
    for seed in range(5):
        u = np.random.default_rng(seed).standard_normal(emb.shape[1]).astype(np.float32)
        near = np.argsort(-(route.centroids @ u))[:3]
        inside = np.flatnonzero(np.isin(lists, near))
        k = min(10, inside.size)
        got, got_s = route._match(emb, starts, u, k)
        assert np.isin(got, inside).all()
        brute = inside[np.argsort(-(emb[inside] @ u))[:k]]          # the best k of those lists, directly
        assert np.allclose(np.sort(got_s), np.sort(emb[brute] @ u), atol=1e-5)
    route.close()
