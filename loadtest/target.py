"""The server side of a load test: start one on loopback, watch its processes, scrape its metrics."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from engine.app.ready import NotReady, Ready, free_port, wait_ready

REPO = Path(__file__).absolute().parents[1]


class Server:
    """`recserve serve` on loopback with a free port and a metrics port, as a subprocess.

    Its stderr goes to `log` (the caller's stderr when None); stdout is read for the ready line."""

    def __init__(self, config: str | Path, bundle: str | Path, workers: int | None = 1, log: Path | None = None,
                 timeout_s: float = 300.0, extra: tuple[str, ...] = ()):
        """`workers=None`: a server without worker processes or /metrics (`--backend ray` in `extra`)."""
        port = free_port()
        self.state_dir = None
        if "--state-dir" not in extra and "--feature-store" not in extra:
            # the embedded store persists (event log fsync'd per ReportEvents): measured as served,
            # but in a throwaway folder, never the user's default state dir
            self.state_dir = tempfile.mkdtemp(prefix="recserve-loadtest-state-")
            extra = (*extra, "--state-dir", self.state_dir)
        self.metrics_url = f"http://127.0.0.1:{port}/metrics" if workers is not None else None
        native = ("--workers", str(workers), "--metrics-port", str(port)) if workers is not None else ()
        cmd = [sys.executable, "-m", "engine.cli.main", "serve", "--config", str(config), "--bundle", str(bundle),
               "--port", "0", *native, *extra]
        ready = self._start(cmd, "recserve", log, timeout_s)
        self.target, self.version, self.workers = ready.target, ready.version, ready.workers

    def _start(self, cmd: list[str], server: str, log: Path | None, timeout_s: float, cwd: Path = REPO,
               env: dict[str, str] | None = None) -> Ready:
        """Run `cmd` from `cwd` (the repo root) and wait for its ready line."""
        err = open(log, "w") if log else None
        try:
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        finally:
            if err:
                err.close()
        try:
            return wait_ready(self.proc, timeout_s, server)
        except NotReady as e:
            self.stop()
            where = f"; see {log}" if log else ""
            raise RuntimeError(f"{e}{where}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "state_dir", None):
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProcProbe:
    """CPU (in cores) and peak RSS of processes, with their children, over a window."""

    def __init__(self, pids: list[int], children: bool = True):
        try:
            self.roots = [psutil.Process(p) for p in pids]
        except psutil.NoSuchProcess as e:
            raise ValueError(f"no process with pid {e.pid} to measure") from None
        self.children = children

    def _procs(self) -> list[psutil.Process]:
        out = list(self.roots)
        if self.children:
            for r in self.roots:
                try:
                    out += r.children(recursive=True)
                except psutil.NoSuchProcess:
                    pass
        return out

    def _cpu(self) -> dict[int, float]:
        out = {}
        for p in self._procs():
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return out

    def start(self) -> None:
        self.t, self.cpu0, self.rss = time.monotonic(), self._cpu(), 0
        self.mark = (self.t, self.cpu0)
        self.sample()

    def interval(self) -> dict[str, Any]:
        """RSS now (in all and per process, the root first), PSS and private bytes, and cores
        since the previous call (or start): one row of a soak. RSS counts a page of the shared
        feature-state arrays once in every worker that touched it, so it grows as a worker reaches
        rows it had not read yet; PSS splits shared pages between their processes and private
        (USS) is what only one process holds: a leak grows those (smaps, read once an interval)."""
        now, cpu = time.monotonic(), self._cpu()
        t0, cpu0 = self.mark
        self.mark = (now, cpu)
        used = sum(v - cpu0.get(pid, 0.0) for pid, v in cpu.items())
        each, pss, uss = [], 0.0, 0.0
        for p in self._procs():
            try:
                m = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            each.append(m.rss / 2**20)
            pss, uss = pss + m.pss / 2**20, uss + m.uss / 2**20
        return {"rss_mb": sum(each), "rss_mb_each": each, "pss_mb": pss, "private_mb": uss,
                "cpu_cores": used / (now - t0) if now > t0 else 0.0}

    def _rss(self) -> int:
        rss = 0
        for p in self._procs():
            try:
                rss += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return rss

    def sample(self) -> None:
        self.rss = max(self.rss, self._rss())

    def stop(self) -> dict[str, Any]:
        self.sample()
        cpu1, dt = self._cpu(), time.monotonic() - self.t
        used = sum(v - self.cpu0.get(pid, 0.0) for pid, v in cpu1.items())
        root = sum(cpu1.get(p.pid, 0.0) - self.cpu0.get(p.pid, 0.0) for p in self.roots)
        return {"cpu_cores": used / dt if dt > 0 else 0.0, "rss_mb_peak": self.rss / 2**20, "processes": len(cpu1),
                # the root alone: the native server's supervisor with its gRPC front (workers are children)
                "root_cpu_cores": root / dt if dt > 0 else 0.0}


def metrics_url(spec: str) -> str:
    """`host:port`, `http://host:port` or a full URL -> the URL of the /metrics page."""
    url = spec if "://" in spec else f"http://{spec}"
    return url if urllib.parse.urlsplit(url).path not in ("", "/") else url.rstrip("/") + "/metrics"


def scrape_stages(url: str) -> dict[str, tuple[float, float]]:
    """Stage name -> (seconds sum, count) of the server's `recserve_stage_seconds` histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "recserve_stage_seconds":
            continue
        for s in fam.samples:
            if s.name.endswith(("_sum", "_count")):
                out.setdefault(s.labels["stage"], [0.0, 0.0])[s.name.endswith("_count")] += s.value
    return {k: (v[0], v[1]) for k, v in out.items()}
