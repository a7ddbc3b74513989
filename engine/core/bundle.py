"""Versioned model bundle: verified whole, read-only, shared between workers through mmap.

Layout of a bundle root:
    CURRENT                 name of the version folder to serve
    <version>/manifest.json version, config, schema, shapes, metrics, sha256 of every file
    <version>/models/       user_tower.onnx item_tower.onnx coarse_dnn.onnx fine.onnx coarse_trees.txt
    <version>/tables/       *.npy id-embedding and item/user attribute tables, the item-to-item
                            neighbour table as CSR (i2i_indptr, i2i_indices, i2i_weights; no pickles)
    <version>/state/        *.npy feature state at the end of the log (seeds the feature store)
    <version>/index/        items.faiss
    <version>/config/       the config TOML it was built from and the stages' side files (whitelist,
                            blocklist) beside it: `recserve eval`, `serve` and reloads need no checkout
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.core import pages
from engine.core.errors import BundleError
from engine.core.featurize import I2ITable, Tables
from engine.core.state import FeatureState

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
FORMAT = 1


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    tables: Tables
    state: FeatureState
    user_ids: np.ndarray
    item_ids: np.ndarray

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.manifest["schema"]["tasks"])

    def file(self, rel: str) -> Path:
        return self.path / rel

    @property
    def config_path(self) -> Path:
        """The config this bundle was built from: its own checksummed copy."""
        return _carried_config(self.path, self.manifest)

    def populate(self) -> None:
        """Map every table the request path reads into this process now (engine.core.pages): a
        server's RSS then stays flat instead of climbing as new ids fault their rows in. The
        feature state is left out: the store copies it once and drops it."""
        t = self.tables
        arrays = [getattr(t, f.name) for f in dataclasses.fields(t) if isinstance(getattr(t, f.name), np.ndarray)]
        if t.i2i is not None:
            arrays += [t.i2i.indptr, t.i2i.indices, t.i2i.weights]
        for a in (*arrays, self.user_ids, self.item_ids):
            pages.populate(a)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(path: str | Path) -> Path:
    """A bundle root (holding CURRENT) or a version folder -> the version folder."""
    path = Path(path)
    if (path / CURRENT).is_file():
        name = (path / CURRENT).read_text().strip()
        if not name or "/" in name or name.startswith("."):
            raise BundleError(f"{path / CURRENT}: does not name a version folder")
        path = path / name
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path}: no {MANIFEST} (not a bundle, or CURRENT points at a missing version)")
    return path


def config_file(path: str | Path) -> Path:
    """The config a bundle (root or version folder) carries, from its manifest alone: for a
    server's parent process, which reads the config before any worker verifies the bundle."""
    vdir = resolve(path)
    try:
        manifest = json.loads((vdir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{vdir / MANIFEST}: unreadable: {e}") from None
    return _carried_config(vdir, manifest)


def _carried_config(vdir: Path, manifest: dict[str, Any]) -> Path:
    rel = manifest.get("config", {}).get("file")
    if not rel:
        raise BundleError(f"{vdir}: built before bundles carried their config; pass --config or rebuild it")
    return vdir / rel


def current_version(root: str | Path) -> str | None:
    p = Path(root) / CURRENT
    return p.read_text().strip() if p.is_file() else None


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Load and check a bundle; raise BundleError on any missing, extra-size or corrupt file."""
    vdir = resolve(path)
    try:
        manifest = json.loads((vdir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{vdir / MANIFEST}: unreadable: {e}") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{vdir / MANIFEST}: format {manifest.get('format')!r}, this server reads {FORMAT}")
    files = manifest.get("files", {})
    for rel, meta in files.items():
        p = vdir / rel
        if not p.is_file():
            raise BundleError(f"{p}: listed in the manifest but missing")
        if p.stat().st_size != meta["bytes"]:
            raise BundleError(f"{p}: size {p.stat().st_size} != manifest {meta['bytes']}")
        if verify and sha256_file(p) != meta["sha256"]:
            raise BundleError(f"{p}: sha256 mismatch (corrupt or modified)")

    def arr(rel: str) -> np.ndarray:
        if rel not in files:
            raise BundleError(f"{vdir}: manifest lists no {rel}")
        try:
            # a plain ndarray view of the mmap: np.memmap's Python __getitem__ costs ~6 us per
            # gather, ~20 gathers a request (the memmap stays alive as the view's base)
            return np.asarray(np.load(vdir / rel, mmap_mode="r", allow_pickle=False))
        except ValueError as e:
            raise BundleError(f"{vdir / rel}: not a plain .npy array: {e}") from None

    schema = manifest["schema"]
    tables = Tables(**{k: arr(f"tables/{k}.npy") for k in (
        "item_emb", "item_id_emb", "item_category", "item_author", "item_content",
        "item_created", "user_id_emb", "user_profile")},
        profile_cardinality=tuple(schema["profile_cardinality"]),
        context_cardinality=tuple(schema["context_cardinality"]))
    for name in ("item_category", "item_author"):    # the stages count codes with bincount
        col = getattr(tables, name)
        if col.size and (low := int(col.min())) < 0:
            raise BundleError(f"{vdir}/tables/{name}.npy: code {low} (codes are >= 0, 0 for unknown)")
    if "i2i" in manifest:
        tables.i2i = I2ITable(*(arr(f"tables/i2i_{k}.npy") for k in ("indptr", "indices", "weights")),
                              decay=float(manifest["i2i"]["decay"]))
    st = manifest["state"]
    state = FeatureState(**{k: arr(f"state/{k}.npy") for k in (
        "user_recent", "user_seen", "user_n_imp", "user_n_pos", "item_n_imp", "item_n_pos",
        "item_hot")}, t_ref=st["t_ref"], time=st["time"])
    return Bundle(vdir, manifest, tables, state, arr("tables/user_ids.npy"), arr("tables/item_ids.npy"))
