"""Write a bundle version: a temporary folder, checksummed, renamed into place, then CURRENT.

A version derived from another (the streaming trainer's: new ranker graphs, everything else as
it was) hard-links the unchanged files instead of copying them, so a version costs only what
changed. Bundle files are never rewritten in place (faiss and numpy files are replaced by
rename), so a link shared by two versions is as safe as a copy."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.bundle import CURRENT, FORMAT, MANIFEST, sha256_file


class BundleWriter:
    """Collects files in a temp folder beside the root; `commit` makes them a version atomically."""

    def __init__(self, root: str | Path, prefix: str = ".building-"):
        """`prefix`: of the temp folder (a writer that cleans up after itself names its own)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))
        self._known: dict[str, dict[str, Any]] = {}     # linked files: checksums from their manifest

    def path(self, rel: str) -> Path:
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def array(self, rel: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        if a.dtype == object:
            raise TypeError(f"{rel}: object arrays would need pickle")
        np.save(self.path(rel), a, allow_pickle=False)

    def link(self, src: Path, rel: str, meta: dict[str, Any] | None = None) -> None:
        """Hard-link `src` (a file of another version on the same filesystem) as `rel`; `meta`,
        its manifest entry there, spares hashing it again."""
        os.link(src, self.path(rel))
        if meta is not None:
            self._known[rel] = meta

    def link_version(self, base: Path, skip: set[str] = frozenset()) -> dict[str, Any]:
        """Link every file of version folder `base` but `skip` (rewritten by the caller) and its
        manifest; returns the base's manifest."""
        manifest = json.loads((base / MANIFEST).read_text())
        for rel, meta in manifest["files"].items():
            if rel not in skip:
                self.link(base / rel, rel, meta)
        return manifest

    def commit(self, manifest: dict[str, Any], version: str | None = None) -> Path:
        """Checksum every file, write the manifest, rename into place and point CURRENT at it."""
        version = version or time.strftime("v%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid()}"
        files = {}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.tmp).as_posix()
                known = self._known.get(rel)
                size = p.stat().st_size
                files[rel] = ({"sha256": known["sha256"], "bytes": size} if known and known["bytes"] == size
                              else {"sha256": sha256_file(p), "bytes": size})
        manifest = {"format": FORMAT, "version": version, "created_unix": time.time(),
                    **manifest, "files": files}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=_json_default))
        final = self.root / version
        os.rename(self.tmp, final)
        point_current(self.root, version)
        return final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def point_current(root: Path, version: str) -> None:
    tmp = root / f".{CURRENT}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, root / CURRENT)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
