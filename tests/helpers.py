"""Small helpers shared by test modules (pytest puts tests/ on sys.path): waiting, and the real
server as a subprocess with the bundle-root chores a deploy does (copy, publish, point CURRENT)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.app.client import RecServeClient
from engine.app.ready import NotReady, wait_ready
from protos import pb2


def wait_for(pred, timeout: float = 20, what: str = "condition", every: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


REPO = Path(__file__).absolute().parents[1]
TOKEN = "test-token"
READY_TIMEOUT_S = 180
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]   # a new TCP connection per client


class Server:
    """`recserve serve` in a subprocess; waits for its ready line."""

    def __init__(self, tmp: Path, config: Path | None, bundle: Path, workers: int | None = 1,
                 extra: tuple[str, ...] = (), entry: tuple[str, ...] = ("-m", "engine.cli.main"), port: int = 0,
                 cwd: Path = REPO):
        """`config=None`: the server uses the config the bundle carries."""
        self.stderr_path = tmp / f"server-{time.monotonic_ns()}.stderr"
        cmd = [sys.executable, *entry, "serve", *(("--config", str(config)) if config else ()),
               "--bundle", str(bundle), "--port", str(port), *(("--workers", str(workers)) if workers else ()),
               *extra]
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            ready = wait_ready(self.proc, READY_TIMEOUT_S)
        except NotReady:
            self.kill()
            raise AssertionError(f"server did not start:\n{self.stderr()}") from None
        self.target, self.info = ready.target, ready.info     # info: workers=, bundle=, backend=...
        self.workers, self.version = ready.workers, ready.version

    def client(self, token: str | None = TOKEN, **kw) -> RecServeClient:
        return RecServeClient(self.target, token=token, **kw)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def terminate(self, timeout: float = 60) -> int | None:
        """SIGTERM and the exit code; a server that does not stop is killed and gives None."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def copy_bundle(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def publish_copy(root: Path, new: str, corrupt: bool = False) -> None:
    """Copy the CURRENT version to `new` (manifest version rewritten), optionally corrupt one of
    its files, and point CURRENT at it atomically, as a deploy would."""
    old = root / (root / "CURRENT").read_text().strip()
    copy_bundle(old, root / new)
    manifest = root / new / "manifest.json"
    m = json.loads(manifest.read_text())
    m["version"] = new
    manifest.write_text(json.dumps(m, indent=1))
    if corrupt:
        victim = max((f for f in (root / new).rglob("*") if f.is_file() and f.name != "manifest.json"),
                     key=lambda f: f.stat().st_size)
        with open(victim, "ab") as f:
            f.write(b"corrupt")
    point(root, new)


def point(root: Path, version: str) -> None:
    """Write CURRENT atomically: a poller must never read half a name."""
    tmp = root / ".CURRENT.test"
    tmp.write_text(version + "\n")
    os.replace(tmp, root / "CURRENT")


def worker_status(server: Server, tries: int = 60) -> dict[int, pb2.GetStatusResponse]:
    """GetStatus over many fresh connections, so every worker answers at least once."""
    seen: dict[int, pb2.GetStatusResponse] = {}
    for _ in range(tries):
        with server.client(options=OWN_CONNECTION) as c:
            s = c.status()
        seen[s.pid] = s
        if len(seen) == server.workers:
            break
    return seen
