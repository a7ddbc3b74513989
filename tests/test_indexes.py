"""indexes/: every kind builds, searches, round-trips through a file, and is as exact as promised."""
from __future__ import annotations

import numpy as np
import pytest

from indexes import build_index, load_index, measure_recall, tune_nprobe

KINDS = ("flat", "ivf_flat", "ivf_sq8")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 16))
    emb = _unit(centers[rng.integers(0, 20, 4000)] + 0.5 * rng.standard_normal((4000, 16)))
    queries = _unit(emb[rng.integers(0, 4000, 50)] + 0.3 * rng.standard_normal((50, 16)))
    return emb, queries


def _cfg(kind: str) -> dict:
    return {"kind": kind, "nlist": 64, "nprobe": 8, "train_size": 4000}


@pytest.mark.parametrize("kind", KINDS)
def test_build_search_and_round_trip(kind, data, tmp_path):
    emb, queries = data
    index = build_index(emb, **_cfg(kind))
    assert (index.kind, index.ntotal, index.d) == (kind, 4000, 16)
    scores, ids = index.search(queries, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int32 and ids.shape == (50, 10)
    assert (ids >= 0).all() and (np.diff(scores, axis=1) <= 1e-6).all()
    index.save(tmp_path / "items.faiss")
    loaded = load_index(tmp_path / "items.faiss")
    assert loaded.nprobe == index.nprobe
    s2, i2 = loaded.search(queries, 10)
    np.testing.assert_array_equal(i2, ids)
    np.testing.assert_array_equal(s2, scores)


def test_flat_is_exact(data):
    emb, queries = data
    assert measure_recall(build_index(emb, **_cfg("flat")), emb, queries, 100) == 1.0


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_sq8"])
def test_ivf_recall_and_tuning(kind, data):
    emb, queries = data
    index = build_index(emb, **_cfg(kind))
    assert measure_recall(index, emb, queries, 100) > 0.6
    nprobe = tune_nprobe(index, emb, queries, 100, target=0.95)
    assert index.nprobe == nprobe < index.nlist
    assert measure_recall(index, emb, queries, 100) >= 0.95
    index.nprobe = nprobe - 1
    assert measure_recall(index, emb, queries, 100) < 0.95


def test_nlist_clipped_for_small_catalog(data):
    index = build_index(data[0][:390], **_cfg("ivf_sq8"))
    assert index.nlist == 10 and index.nprobe == 8


@pytest.mark.parametrize("kind", KINDS)
def test_pads_with_minus_one_when_k_exceeds_catalog(kind, data):
    emb, queries = data
    small = emb[:100]
    index = build_index(small, kind=kind, nlist=2, nprobe=2, train_size=100)
    _, ids = index.search(queries[:3], 150)
    assert ids.shape == (3, 150)
    assert (ids[:, 100:] == -1).all() and sorted(ids[0, :100]) == list(range(100))
