"""Where a server keeps the embedded store's state, and making sure it is the only one there.

Persistence is the default: `--state-dir DIR`, else $RECSERVE_STATE_DIR, else
`${XDG_STATE_HOME:-~/.local/state}/recserve/<bundle root name>-<hash of its path>`, so a server
restarted on the same bundle root finds its state; `none` keeps the state in memory only.
Two servers on one state dir would overwrite each other's snapshots and log, so a server holds
`server.lock` for its lifetime and, before it starts, waits until no store of a previous
server (workers still draining after their parent died) holds `stores.lock`.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from engine.store.persistence import STORES_LOCK

log = logging.getLogger("recserve.store")

ENV = "RECSERVE_STATE_DIR"
SERVER_LOCK = "server.lock"
SHM_RECORD = "shared-dir"        # the shared-array dir of the server that last held the lock
WAIT_S = 60.0                    # for a previous server's workers to finish draining


class StateDirBusy(RuntimeError):
    pass


def default_state_dir(bundle_root: Path) -> Path:
    root = Path(bundle_root).resolve()
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "recserve" / f"{root.name}-{hashlib.sha1(str(root).encode()).hexdigest()[:8]}"


def resolve(arg: str | None, bundle_root: Path, embedded: bool) -> str | None:
    """The state dir a server uses: `arg` (--state-dir) if given, else $RECSERVE_STATE_DIR,
    else the default; None for 'none', and for a store that persists itself (Redis) unless
    `arg` names a dir (which the store factory then refuses)."""
    value = arg if arg is not None else os.environ.get(ENV) or None
    if value is not None and value.strip().lower() == "none":
        return None
    if value is not None and (arg is not None or embedded):
        return str(Path(value).expanduser())
    return str(default_state_dir(bundle_root)) if embedded else None


class StateDirClaim:
    """This server's hold on a state dir; `shared_dir`: where its workers map the arrays."""

    def __init__(self, path: str | Path, shared_dir: str, wait_s: float = WAIT_S):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path / SERVER_LOCK, "a+")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.seek(0)
            who = self._f.read().strip() or "unknown pid"
            self._f.close()
            raise StateDirBusy(f"state dir {self.path} is in use by another recserve server ({who}); give each "
                               f"server its own (--state-dir DIR), or --state-dir none") from None
        try:
            self._wait_for_old_stores(wait_s)
        except StateDirBusy:
            self._f.close()
            raise
        self._drop_old_shared_dir(shared_dir)
        self._f.seek(0)
        self._f.truncate()
        self._f.write(f"pid {os.getpid()}\n")
        self._f.flush()
        log.info("feature state dir: %s", self.path)

    def _wait_for_old_stores(self, wait_s: float) -> None:
        end = time.monotonic() + wait_s
        with open(self.path / STORES_LOCK, "a+") as f:
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                    return
                except BlockingIOError:
                    if time.monotonic() > end:
                        raise StateDirBusy(f"state dir {self.path} is still used by the workers of a previous "
                                           f"server after {wait_s:.0f} s; stop them first") from None
                    time.sleep(0.1)

    def _drop_old_shared_dir(self, shared_dir: str) -> None:
        """The previous holder died without cleaning up (SIGKILL): free the memory of its
        shared arrays. Only a recserve-store-* dir next to ours is removed."""
        record = self.path / SHM_RECORD
        if record.exists():
            old = Path(record.read_text().strip())
            new = Path(shared_dir)
            if old != new and old.parent == new.parent and old.name.startswith("recserve-store-") and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
                log.warning("removed %s, the shared state of a server that did not stop cleanly", old)
        record.write_text(f"{shared_dir}\n")

    def release(self) -> None:
        self._f.close()
