"""Publishing a streamed version: new files written, the rest hard-linked from the parent,
checkpoints beside the bundle, then CURRENT flipped; and the housekeeping around it.

Order, for a trainer that may be killed at any point: (1) the version's files in a temp folder
(`.streaming-*`), (2) its checkpoints in `checkpoints/.<version>.tmp`, renamed into place,
(3) the version folder renamed into place and CURRENT pointed at it (BundleWriter.commit).
Until (3) nothing is published: a restart resumes from the version CURRENT names and
`clean()` removes what a killed trainer left half-done.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from engine.core.bundle import MANIFEST, current_version
from model_export.bundle_writer import BundleWriter

TMP_PREFIX = ".streaming-"
CHECKPOINTS = "checkpoints"
STREAMED = re.compile(r"-s\d{6}$")     # version_name's suffix


def stream_info(vdir: Path) -> dict[str, Any] | None:
    """The `stream` section of a version's manifest (None: an offline build)."""
    try:
        return json.loads((vdir / MANIFEST).read_text()).get("stream")
    except (OSError, json.JSONDecodeError):
        return None


def version_name(seq: int) -> str:
    return time.strftime("v%Y%m%d-%H%M%S", time.gmtime()) + f"-s{seq:06d}"


def commit_version(writer: BundleWriter, parent: Path, version: str, written: set[str],
                   manifest_update: dict[str, Any], save_checkpoints) -> Path:
    """Link the parent's unchanged files, save the checkpoints (`save_checkpoints(dir)`), then
    commit the version and flip CURRENT."""
    manifest = writer.link_version(parent, skip=written)
    for k in ("format", "version", "files"):
        manifest.pop(k)
    for k, v in manifest_update.items():
        if isinstance(v, dict) and isinstance(manifest.get(k), dict):
            manifest[k] = {**manifest[k], **v}
        else:
            manifest[k] = v
    ckpt = writer.root / CHECKPOINTS
    tmp = ckpt / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoints(tmp)
    tmp.rename(ckpt / version)
    return writer.commit(manifest, version)


def clean(root: Path) -> list[str]:
    """What a killed trainer left: temp folders, checkpoint temp folders, and streamed versions
    (with their checkpoints) that were written but never published, i.e. newer than the one
    CURRENT names in its lineage. Call with the trainer lock held."""
    removed = []
    for p in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    for p in (root / CHECKPOINTS).glob(".*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(f"{CHECKPOINTS}/{p.name}")
    name = current_version(root)
    cur = stream_info(root / name) if name else None
    cur_seq = cur["seq"] if cur else 0
    for v, info in streamed(root).items():
        if v != name and info["seq"] > cur_seq:
            remove_version(root, v)
            removed.append(v)
    for p in (root / CHECKPOINTS).iterdir() if (root / CHECKPOINTS).is_dir() else ():
        if p.is_dir() and not (root / p.name).is_dir() and STREAMED.search(p.name):
            shutil.rmtree(p, ignore_errors=True)       # a streamed version's checkpoints, version gone
            removed.append(f"{CHECKPOINTS}/{p.name}")
    return removed


def streamed(root: Path) -> dict[str, dict[str, Any]]:
    """Streamed versions in the root: name -> stream section."""
    out = {}
    for p in root.iterdir():
        if p.is_dir() and not p.name.startswith(".") and p.name != CHECKPOINTS:
            info = stream_info(p)
            if info is not None:
                out[p.name] = info
    return out


def remove_version(root: Path, version: str) -> None:
    """A server that mapped its files keeps reading them (unlinked inodes live on)."""
    shutil.rmtree(root / CHECKPOINTS / version, ignore_errors=True)
    shutil.rmtree(root / version, ignore_errors=True)


def prune(root: Path, keep: int) -> list[str]:
    """Keep the newest `keep` streamed versions and whatever CURRENT names; offline builds stay."""
    current = current_version(root)
    by_seq = sorted(streamed(root).items(), key=lambda kv: kv[1]["seq"])
    gone = [v for v, _ in by_seq[:-keep] if v != current]
    for v in gone:
        remove_version(root, v)
    return gone
