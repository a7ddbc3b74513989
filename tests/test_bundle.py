"""The built bundle: every promised file, a manifest the server can rely on, checksums that
catch a flipped byte or a missing file, reuse by config fingerprint, and loadable checkpoints."""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch

from engine.core.bundle import load_bundle, resolve, sha256_file
from engine.core.errors import BundleError
from engine.core.config import load_config
from engine.core.featurize import COARSE_FEATURES
from model_export.build import build_bundle

FILES = ([f"models/{m}.onnx" for m in ("user_tower", "item_tower", "coarse_dnn", "fine")]
         + ["models/coarse_trees.txt", "index/items.faiss"]
         + [f"tables/{t}.npy" for t in ("item_emb", "item_id_emb", "item_category", "item_author", "item_content",
                                        "item_created", "user_id_emb", "user_profile", "user_ids", "item_ids",
                                        "category_emb", "author_emb")]
         + [f"state/{s}.npy" for s in ("user_recent", "user_seen", "user_n_imp", "user_n_pos", "item_n_imp",
                                       "item_n_pos", "item_hot")])


@pytest.fixture()
def copy(tiny_bundle, tmp_path):
    """A private copy of the current version, free to damage."""
    dst = tmp_path / "v"
    shutil.copytree(resolve(tiny_bundle), dst)
    return dst


def test_manifest_lists_every_file_with_matching_checksums(tiny_bundle):
    vdir = resolve(tiny_bundle)
    files = load_bundle(tiny_bundle).manifest["files"]
    assert set(FILES) <= set(files)
    for rel, meta in files.items():
        assert sha256_file(vdir / rel) == meta["sha256"], rel
        assert (vdir / rel).stat().st_size == meta["bytes"], rel


def test_manifest_fields(tiny_bundle, tiny_config):
    b = load_bundle(tiny_bundle)
    m, cfg = b.manifest, load_config(tiny_config)
    assert m["config"]["fingerprint"] == cfg.fingerprint()
    assert m["config"]["data"] == cfg.raw["data"]
    s = m["schema"]
    assert s["coarse_features"] == list(COARSE_FEATURES) and s["tasks"] == ["click", "like", "finish"]
    assert (s["n_users"], s["n_items"]) == (len(b.user_ids), len(b.item_ids))
    assert s["seen_len"] == cfg.serving.seen_window and s["recent_len"] == cfg.train.recent_len
    assert b.tables.item_emb.shape == (s["n_items"], s["embed_dim"])
    assert np.allclose(np.linalg.norm(b.tables.item_emb, axis=1), 1, atol=1e-4)
    assert np.allclose(np.linalg.norm(b.tables.item_content, axis=1), 1, atol=1e-4)
    assert m["state"]["time"] == m["time"]["t_end"] and m["state"]["half_life_days"] == pytest.approx(
        cfg.serving.hot_half_life_hours / 24)
    assert m["index"]["kind"] == cfg.index.kind and m["index"]["recall"] >= 0.95
    assert m["models"]["fine"]["inputs"] == ["user", "item", "seq", "seq_mask"]
    assert m["models"]["fine"]["outputs"] == ["probs"]
    for rel, shape in m["shapes"].items():
        assert list(np.load(resolve(tiny_bundle) / rel, mmap_mode="r").shape) == shape, rel


def test_flipped_bytes_are_detected(copy):
    p = copy / "tables" / "item_emb.npy"
    data = bytearray(p.read_bytes())
    data[-10:] = bytes(b ^ 0xFF for b in data[-10:])
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="item_emb.npy: sha256 mismatch"):
        load_bundle(copy)


def test_missing_file_is_detected(copy):
    (copy / "models" / "fine.onnx").unlink()
    with pytest.raises(BundleError, match="fine.onnx: listed in the manifest but missing"):
        load_bundle(copy)


def test_same_config_reuses_the_current_version(tiny_bundle, tiny_config):
    t = time.time()
    again = build_bundle(load_config(tiny_config), tiny_bundle)
    assert again == resolve(tiny_bundle) and time.time() - t < 5


def test_checkpoints_load_with_weights_only(tiny_bundle):
    ckpt = tiny_bundle / "checkpoints" / resolve(tiny_bundle).name
    for name in ("two_tower", "coarse_dnn", "fine"):
        state = torch.load(ckpt / f"{name}.pt", weights_only=True)
        assert state and all(isinstance(v, torch.Tensor) for v in state.values())
