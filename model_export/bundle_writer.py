"""Write a bundle version: a temporary folder, checksummed, renamed into place, then CURRENT."""
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

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=self.root))

    def path(self, rel: str) -> Path:
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def array(self, rel: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        if a.dtype == object:
            raise TypeError(f"{rel}: object arrays would need pickle")
        np.save(self.path(rel), a, allow_pickle=False)

    def commit(self, manifest: dict[str, Any], version: str | None = None) -> Path:
        """Checksum every file, write the manifest, rename into place and point CURRENT at it."""
        version = version or time.strftime("v%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid()}"
        files = {}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file():
                files[p.relative_to(self.tmp).as_posix()] = {"sha256": sha256_file(p),
                                                             "bytes": p.stat().st_size}
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
