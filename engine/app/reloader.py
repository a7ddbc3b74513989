"""Hot reload of a worker's bundle: follow the root's CURRENT pointer, load a version on
request (Admin.ReloadBundle), refuse a bad one with a status and the reason while the old one
keeps serving. Also the small pieces a refusal needs: `Abort` (refuse a call with a status
from inside a handler) and `one_line` (an error as one line).
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import grpc

from engine.core.bundle import MANIFEST
from engine.core.errors import BundleError

log = logging.getLogger("recserve.server")


def one_line(e: BaseException) -> str:
    """The message of our own errors (they name the culprit), else type and first line."""
    text = (str(e).strip().splitlines() or [""])[0]
    return text if type(e).__name__ in ("BundleError", "ConfigError") else f"{type(e).__name__}: {text}"


class Abort(Exception):
    """Refuse a call with this status from inside a handler."""

    def __init__(self, code: grpc.StatusCode, msg: str):
        super().__init__(msg)
        self.code, self.msg = code, msg


def serving_bundle(path: Path) -> Any:
    """A verified bundle with its tables mapped whole (engine.core.bundle.Bundle.populate)."""
    from engine.core.bundle import load_bundle

    bundle = load_bundle(path)
    bundle.populate()
    return bundle


def initial_bundle(path: Path, fallback: str) -> tuple[Path | None, str, Any, set[str]]:
    """(root, version folder, bundle, refused versions): CURRENT of a bundle root, or the
    fallback version the other workers serve if CURRENT is broken; or a plain version
    folder, which is then never reloaded."""
    pointer = path / "CURRENT"
    if not pointer.exists():
        return None, path.name, serving_bundle(path), set()
    name = pointer.read_text().strip()
    try:
        return path, name, serving_bundle(path / name), set()
    except BundleError as e:
        if not fallback or fallback == name:
            raise
        log.error("bundle %s refused (%s); serving %s like the other workers", name, e, fallback)
        return path, fallback, serving_bundle(path / fallback), {name}


class Reloader:
    """Follows CURRENT; remembers refused versions so a bad one is not retried every poll."""

    def __init__(self, root: Path | None, current: str, worker: Any):   # engine.app.service.Service
        self.root, self.current, self.w = root, current, worker
        self.refused: set[str] = set()
        self.lock = threading.Lock()

    def poll(self) -> None:
        name = self._pointer()
        if name and name != self.current and name not in self.refused:
            self._swap(name)

    def reload(self, path: str | None) -> str:
        """Admin.ReloadBundle: load `path` (a version folder of the root: its name or absolute
        path) here, then publish it in CURRENT for the other workers; without a path, re-read
        CURRENT now, retrying a version refused before. Returns what serves now; a refusal
        raises Abort: INVALID_ARGUMENT for a path that names no version folder of the root,
        FAILED_PRECONDITION when there is nothing to reload or the version fails to load,
        verify or answer the smoke request (the old one keeps serving)."""
        if self.root is None:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         "started on a version folder, not a bundle root with CURRENT: nothing to reload")
        if path is None:
            name = self._pointer()
            if name is None:
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.root}/CURRENT is missing or empty")
        else:
            name = self._version_name(path)
        self.refused.discard(name)
        ok, msg = self._swap(name)
        if not ok:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, msg)
        if path is not None and self._pointer() != name:
            try:
                write_atomic(self.root / "CURRENT", name + "\n")
            except OSError as e:
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"loaded {name} on this worker only, cannot write CURRENT ({e.strerror}): "
                             "it returns to the version CURRENT names on its next poll") from None
            msg += "; CURRENT updated, other workers follow within ~1 s"
        return msg

    def _pointer(self) -> str | None:
        if self.root is None:
            return None
        try:
            return (self.root / "CURRENT").read_text().strip() or None
        except OSError:
            return None

    def _version_name(self, path: str) -> str:
        """The version folder `path` names inside the root, or Abort(INVALID_ARGUMENT) saying why not."""
        def refuse(why: str) -> Abort:
            shown = path if len(path) <= 120 else path[:100] + f"... ({len(path)} characters)"
            return Abort(grpc.StatusCode.INVALID_ARGUMENT, f"path {shown!r}: {why}")

        if not path.strip():
            raise refuse("empty; leave path unset to re-read CURRENT")
        if "\0" in path:
            raise refuse("contains a NUL byte")
        try:
            p = (self.root / path).resolve()     # an absolute path replaces the root
            inside, is_dir = p.parent == self.root.resolve(), p.is_dir()
            has_manifest = is_dir and (p / MANIFEST).is_file()
        except OSError as e:                     # too long, a loop of symlinks, ...
            raise refuse(e.strerror or str(e)) from None
        if not inside or not is_dir or p.name.startswith("."):
            raise refuse(f"not a version folder inside {self.root}")
        if not has_manifest:
            raise refuse(f"{p.name} holds no {MANIFEST}: not a bundle version")
        return p.name

    def _swap(self, name: str) -> tuple[bool, str]:
        with self.lock:
            if name == self.current:
                return True, f"already serving {name}"
            old_version = self.w.engine.bundle_version
            try:
                self.w.engine.swap_bundle(serving_bundle(self.root / name))
            except Exception as e:    # noqa: BLE001 - whatever breaks, the old bundle keeps serving
                if not isinstance(e, BundleError):
                    log.exception("loading bundle %s failed", name)
                self.refused.add(name)
                self.w.metrics.reloads.labels("refused").inc()
                self.w.count("reloads_refused")
                msg = f"reload of {name} failed: {one_line(e)}; still serving {old_version}"
                log.error(msg)
                return False, msg
            self.current = name
            new = self.w.engine.bundle_version
            self.w.metrics.bundle.labels(old_version).set(0)
            self.w.metrics.bundle.labels(new).set(1)
            self.w.metrics.reloads.labels("ok").inc()
            self.w.count("reloads_ok")
            return True, f"serving {new}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
