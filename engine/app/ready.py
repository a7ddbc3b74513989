"""The line a server prints on stdout once it answers, and a free loopback port.

`recserve serve` (native and Ray) and the load test's baseline print one ready line:

    recserve serving on HOST:PORT workers=2 bundle=v20250101-000000-123
    recserve serving on 0.0.0.0:PORT backend=ray replicas=2 bundle=... fine=split
    baseline serving on HOST:PORT

Whoever starts a server as a subprocess (`make demo`, the load test, the tests) waits for it
with `wait_ready`, so the format lives here only: in the serving shell, which the load
tools and the command line sit above.
"""
from __future__ import annotations

import queue
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Ready:
    """A parsed ready line: where to connect and the server's key=value facts."""

    server: str                     # recserve | baseline
    target: str                     # host:port, as printed
    info: dict[str, str] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.info.get("bundle", "")

    @property
    def workers(self) -> int:
        """Worker processes of a native server; 0 for Ray and the baseline."""
        return int(self.info.get("workers", 0))

    @property
    def line(self) -> str:
        facts = "".join(f" {k}={v}" for k, v in self.info.items())
        return f"{self.server} serving on {self.target}{facts}"


def print_ready(target: str, server: str = "recserve", **info: object) -> None:
    """Print the ready line (flushed: the parent reads a pipe)."""
    print(Ready(server, target, {k: str(v) for k, v in info.items()}).line, flush=True)


def parse_ready(line: str, server: str = "recserve") -> Ready | None:
    """The Ready of a ready line of `server`, None for any other line."""
    words = line.split()
    if words[:3] != [server, "serving", "on"] or len(words) < 4:
        return None
    return Ready(server, words[3], dict(w.split("=", 1) for w in words[4:] if "=" in w))


class NotReady(RuntimeError):
    """The server exited or stayed silent past the timeout; `returncode` is None if it still runs."""

    def __init__(self, msg: str, returncode: int | None):
        super().__init__(msg)
        self.returncode = returncode


def wait_ready(proc: subprocess.Popen, timeout_s: float, server: str = "recserve") -> Ready:
    """Read `proc`'s stdout (text mode) until its ready line. A thread keeps draining stdout
    afterwards, so a chatty server never blocks on a full pipe. Raises NotReady; the caller
    decides whether to kill the process."""
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        for x in proc.stdout:
            lines.put(x)
        lines.put(None)

    threading.Thread(target=drain, name="ready-line", daemon=True).start()
    end = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            line = ""
        if line and (ready := parse_ready(line, server)):
            return ready
        if line is None or (not line and proc.poll() is not None):
            try:
                code = proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            raise NotReady(f"{server} server exited with code {code} before it was ready", code)
        if time.monotonic() > end:
            raise NotReady(f"{server} server not ready within {timeout_s:.0f} s", proc.poll())


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS's pick); another process may take it before
    the caller binds it, which is why the server's own `--port 0` is preferred where it exists."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
