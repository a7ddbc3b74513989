"""The built bundle: every promised file, a manifest the server can rely on, checksums that
catch a flipped byte or a missing file, reuse by config fingerprint, loadable checkpoints, and
the config it carries (evaluated from any folder)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.core.bundle import load_bundle, resolve, sha256_file
from engine.core.errors import BundleError, ConfigError
from engine.core.config import load_config
from engine.core.featurize import COARSE_FEATURES
from model_export.build import build_bundle

FILES = ([f"models/{m}.onnx" for m in ("user_tower", "item_tower", "coarse_dnn", "fine")]
         + ["models/coarse_trees.txt", "index/items.faiss"]
         + [f"tables/{t}.npy" for t in ("item_emb", "item_id_emb", "item_category", "item_author", "item_content",
                                        "item_created", "user_id_emb", "user_profile", "user_ids", "item_ids",
                                        "category_emb", "author_emb")]
         + [f"state/{s}.npy" for s in ("user_recent", "user_seen", "user_n_imp", "user_n_pos", "item_n_imp",
                                       "item_n_pos", "item_hot")]
         + [f"config/{c}.toml" for c in ("tiny", "whitelist_tiny", "blocklist_tiny")])


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


@pytest.mark.parametrize("rel", ["tables/item_emb.npy", "config/whitelist_tiny.toml"])
def test_flipped_bytes_are_detected(copy, rel):
    p = copy / rel
    data = bytearray(p.read_bytes())
    data[-10:] = bytes(b ^ 0xFF for b in data[-10:])
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{p.name}: sha256 mismatch"):
        load_bundle(copy)


def test_a_negative_category_or_author_code_is_refused(copy):
    p = copy / "tables" / "item_author.npy"
    author = np.load(p)
    author[3] = -1
    np.save(p, author)
    with pytest.raises(BundleError, match="item_author.npy: code -1"):
        load_bundle(copy, verify=False)      # the checksum would refuse it first


def test_missing_file_is_detected(copy):
    (copy / "models" / "fine.onnx").unlink()
    with pytest.raises(BundleError, match="fine.onnx: listed in the manifest but missing"):
        load_bundle(copy)


def test_same_config_reuses_the_current_version(tiny_bundle, tiny_config, capsys):
    t = time.time()
    again = build_bundle(load_config(tiny_config), tiny_bundle)
    assert again == resolve(tiny_bundle) and time.time() - t < 5
    assert "reusing it" in capsys.readouterr().out.strip().splitlines()[-1]


def test_reuse_says_when_the_carried_config_differs(tiny_bundle, tiny_config, tmp_path, capsys):
    """A serving-only edit reuses the models, and the build says the bundle's copy is the old one."""
    edited = _config_copy(tiny_config, tmp_path / "configs", **{"beam_width = 4": "beam_width = 2"})
    assert build_bundle(load_config(edited), tiny_bundle) == resolve(tiny_bundle)
    assert f"copy differs from {edited}" in capsys.readouterr().out


def test_checkpoints_load_with_weights_only(tiny_bundle):
    ckpt = tiny_bundle / "checkpoints" / resolve(tiny_bundle).name
    for name in ("two_tower", "coarse_dnn", "fine"):
        state = torch.load(ckpt / f"{name}.pt", weights_only=True)
        assert state and all(isinstance(v, torch.Tensor) for v in state.values())


def test_bundle_carries_its_config_and_side_files(tiny_bundle, tiny_config):
    b = load_bundle(tiny_bundle)
    assert b.config_path == resolve(tiny_bundle) / "config" / "tiny.toml"
    assert b.manifest["config"]["file"] == "config/tiny.toml"
    for name in ("tiny.toml", "whitelist_tiny.toml", "blocklist_tiny.toml"):
        assert (b.config_path.parent / name).read_bytes() == (tiny_config.parent / name).read_bytes()
    cfg = load_config(b.config_path)
    assert cfg.fingerprint() == b.manifest["config"]["fingerprint"] and cfg.raw == load_config(tiny_config).raw


def test_eval_from_another_folder_uses_the_bundle_config(tiny_bundle, tmp_path):
    """`recserve eval --bundle DIR` without --config, run outside the repository."""
    out = subprocess.run([sys.executable, "-m", "engine.cli.main", "eval", "--bundle", str(tiny_bundle.absolute()),
                          "--users", "20", "--out", "eval"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    config = resolve(tiny_bundle) / "config" / "tiny.toml"
    assert f"Config `{config}`" in (tmp_path / "eval" / "eval.md").read_text()


def _config_copy(tiny_config: Path, dst: Path, **replace: str) -> Path:
    text = tiny_config.read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    dst.mkdir(parents=True, exist_ok=True)
    for f in tiny_config.parent.glob("*list_tiny.toml"):
        shutil.copy(f, dst / f.name)
    (dst / "tiny.toml").write_text(text)
    return dst / "tiny.toml"


def test_a_side_file_outside_the_config_folder_is_refused_before_training(tiny_config, tmp_path):
    shutil.copy(tiny_config.parent / "whitelist_tiny.toml", tmp_path / "shared-whitelist.toml")
    cfg = load_config(_config_copy(tiny_config, tmp_path / "configs",
                                   whitelist_tiny="../shared-whitelist"))
    with pytest.raises(ConfigError, match=r"stage.whitelist.file: ../shared-whitelist.toml: a side file must sit"):
        build_bundle(cfg, tmp_path / "bundles")
    assert not (tmp_path / "bundles").exists() or not any((tmp_path / "bundles").iterdir())


def test_a_config_loaded_with_overrides_is_refused_before_training(tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["serving.max_count=50"])
    with pytest.raises(ConfigError, match="loaded with --set overrides"):
        build_bundle(cfg, tmp_path / "bundles")
    assert not any((tmp_path / "bundles").iterdir())     # the half-written version is gone
