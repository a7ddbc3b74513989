"""The native server's gRPC front: one queue before single-flight workers, admission by expected
queue time, the deadline counted from arrival, a worker dying mid-call, TLS.

Servers here run a script that slows or kills the engine for marked request ids (spawned
workers import the parent's main script, so the patch reaches them), on the tiny bundle. A
slow call leaves a marker file when a worker takes it, so the tests know it is busy.
"""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from helpers import REPO, Server, wait_for

from engine.app.admission import Admission
from engine.app.client import RecServeClient

SCRIPT = f"""\
import os, sys, time
sys.path.insert(0, {str(REPO)!r})
import engine.core.runner

_recommend = engine.core.runner.Engine.recommend

def _patched(self, req):
    if req.request_id.startswith("slow"):
        open(os.environ["RECSERVE_TEST_MARK"] + "-" + req.request_id, "w").close()   # a worker has it
        time.sleep(2.0)
    if req.request_id == "die":
        os._exit(3)
    return _recommend(self, req)

engine.core.runner.Engine.recommend = _patched

if __name__ == "__main__":
    from engine.cli.main import main
    sys.exit(main())
"""


@pytest.fixture
def mark(tmp_path, monkeypatch) -> Path:
    """Where the patched engine says it started a slow call (the servers inherit the variable)."""
    m = tmp_path / "mark"
    monkeypatch.setenv("RECSERVE_TEST_MARK", str(m))
    return m


def _server(tmp: Path, tiny_config: Path, tiny_bundle: Path, serving: str, workers: int = 1,
            extra: tuple[str, ...] = ()) -> Server:
    for f in tiny_config.parent.glob("*list_tiny.toml"):
        shutil.copy(f, tmp / f.name)
    cfg = tmp / "tiny-front.toml"
    cfg.write_text(tiny_config.read_text().replace("[serving]\n", f"[serving]\n{serving}\n", 1))
    script = tmp / "front_serve.py"
    script.write_text(SCRIPT)
    return Server(tmp, cfg, tiny_bundle, workers=workers, entry=(str(script),), extra=extra)


def _in_background(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["resp"] = fn()
        except grpc.RpcError as e:
            out["err"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, out


def _occupy(c: RecServeClient, mark: Path, rid: str) -> tuple[threading.Thread, dict]:
    """A 2 s call, returned once a worker is on it."""
    t, out = _in_background(lambda: c.recommend("u1", count=3, request_id=rid, timeout=30))
    wait_for(lambda: Path(f"{mark}-{rid}").exists(), what="a worker to take the slow call")
    return t, out


@pytest.mark.slow
def test_one_connection_reaches_every_worker_side_by_side(tmp_path, tiny_config, tiny_bundle, mark):
    s = _server(tmp_path, tiny_config, tiny_bundle, "max_queue_ms = 5000.0", workers=2)
    try:
        with s.client() as c:           # one channel: one HTTP/2 connection
            # one call after another: the worker freed last takes the next (its caches are warm)
            served = {c.recommend(f"u{i}", count=3).served_by for i in range(40)}
            assert len(served) == 1, served
            busy = [_occupy(c, mark, f"slow-{i}") for i in range(2)]   # the second starts while the first runs
            for t, _ in busy:
                t.join()
            pids = {c.status().pid for _ in range(40)}      # Admin calls go to any idle worker
        side_by_side = {out["resp"].served_by for _, out in busy}
        assert len(side_by_side) == 2 and served < side_by_side, (served, side_by_side)
        assert len(pids) == 2, pids
        for pid in pids:    # every thread of every worker yields to the front (serving.worker_nice = 5)
            assert {_nice(t) for t in Path(f"/proc/{pid}/task").iterdir()} == {_nice(Path(f"/proc/{s.proc.pid}")) + 5}
    finally:
        assert s.terminate() == 0, s.stderr()


def _nice(task: Path) -> int:
    """A thread's niceness: field 19 of its stat line (after the parenthesised command name)."""
    return int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])


@pytest.mark.slow
def test_admission_queues_a_burst_and_refuses_a_standing_queue(tmp_path, tiny_config, tiny_bundle, mark):
    # one worker; while it is busy, a new call's expected wait (~ a service time) exceeds 1 ms
    s = _server(tmp_path, tiny_config, tiny_bundle, "max_queue_ms = 1.0\nqueue_burst_ms = 300.0")
    try:
        with s.client() as c:
            t, first = _occupy(c, mark, "slow-a")
            queued, second = _in_background(lambda: c.recommend("u2", count=3, timeout=30))   # the burst begins
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as e:        # the wait has stood above 1 ms for 500 ms
                c.recommend("u3", count=3)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "exceeds serving.max_queue_ms 1 for" in e.value.details()
            assert "resp" not in first                 # refused while the slow call still ran
            t.join()
            queued.join()
            assert "resp" in first and len(second["resp"].items) == 3     # queued, not refused
            assert c.status().bundle_version and c.recommend("u3", count=3).items
    finally:
        assert s.terminate() == 0, s.stderr()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["degrade", "error"])
def test_the_deadline_counts_from_arrival(tmp_path, tiny_config, tiny_bundle, mark, policy):
    # a generous queue but a 200 ms budget (configs/tiny.toml): a call that queued ~2 s behind a
    # slow one has no time left for anything skippable, though its client allowed 30 s
    s = _server(tmp_path, tiny_config, tiny_bundle, f'max_queue_ms = 5000.0\non_deadline = "{policy}"')
    try:
        with s.client() as c:
            t, first = _occupy(c, mark, "slow-b")
            if policy == "error":
                with pytest.raises(grpc.RpcError) as e:
                    c.recommend("u2", count=3, timeout=30)
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "for a worker, past serving.deadline_ms 200" in e.value.details()
            else:
                late = c.recommend("u2", count=3, timeout=30, debug=True)
                skipped = {x.name for x in late.trace if x.status == "skipped"}
                assert late.degraded and len(late.items) == 3 and {"coarse_trees", "fine", "rerank"} <= skipped
            t.join()
            assert "resp" in first
            assert c.recommend("u3", count=3).items     # an idle worker: the whole budget again
    finally:
        assert s.terminate() == 0, s.stderr()


@pytest.mark.slow
def test_a_worker_dying_mid_call_costs_that_call_only(tmp_path, tiny_config, tiny_bundle):
    s = _server(tmp_path, tiny_config, tiny_bundle, "max_queue_ms = 5000.0")
    try:
        with s.client() as c:
            before = c.status().pid
            with pytest.raises(grpc.RpcError) as e:
                c.recommend("u1", count=3, request_id="die")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "exited mid-call" in e.value.details()

            def restarted() -> bool:
                try:
                    return c.status(timeout=2).pid != before
                except grpc.RpcError:        # UNAVAILABLE until the new worker is attached
                    return False
            wait_for(restarted, timeout=60, what="the supervisor to restart the worker")
            assert c.recommend("u1", count=3).items
    finally:
        assert s.terminate() == 0, s.stderr()


@pytest.mark.slow
def test_tls(tmp_path, tiny_config, tiny_bundle):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert),
                    "-days", "1"], check=True, capture_output=True)
    s = _server(tmp_path, tiny_config, tiny_bundle, "", extra=("--tls-cert", str(cert), "--tls-key", str(key)))
    try:
        port = s.target.rsplit(":", 1)[1]
        with RecServeClient(f"localhost:{port}", tls_ca=cert) as c:
            assert len(c.recommend("u1", count=3).items) == 3
        with RecServeClient(s.target) as plain, pytest.raises(grpc.RpcError):
            plain.recommend("u1", count=3, timeout=5)
    finally:
        assert s.terminate() == 0, s.stderr()


def test_admission_expects_the_wait_of_the_calls_ahead():
    a = Admission(workers=2, max_queue_ms=50.0, inflight_per_worker=4)
    a.service_ms = 10.0
    assert a.expected_wait_ms(queued=9, idle=1) == 0.0          # an idle worker takes it now
    assert a.expected_wait_ms(queued=0, idle=0) == 5.0          # the first of 2 busy workers to finish
    assert a.refusal(queued=9, idle=0, inflight=7) is None       # (9 + 1) x 10 / 2 = 50 ms: not more
    assert "~55 ms expected wait" in a.refusal(queued=10, idle=0, inflight=7)     # no burst allowance
    assert "serving.max_inflight 4 per worker" in a.refusal(queued=0, idle=1, inflight=8)
    for _ in range(200):
        a.observe(30.0)
    assert 29.0 < a.service_ms <= 30.0                           # follows the workers' recent answers


def test_admission_lets_a_burst_queue_but_not_past_the_deadline():
    a = Admission(workers=2, max_queue_ms=50.0, inflight_per_worker=100, burst_ms=100.0)
    a.service_ms = 10.0
    assert a.refusal(queued=10, idle=0, inflight=12, now=1.00) is None              # 55 ms: a burst begins
    assert a.refusal(queued=12, idle=0, inflight=14, now=1.09, budget_ms=100) is None   # still within 100 ms
    why = a.refusal(queued=12, idle=0, inflight=14, now=1.10, budget_ms=100)
    assert "exceeds serving.max_queue_ms 50 for 100 ms" in why                    # it stood: refused
    assert a.refusal(queued=9, idle=0, inflight=11, now=1.12) is None               # drained: the episode ends
    assert a.refusal(queued=10, idle=0, inflight=12, now=1.13) is None              # a new burst
    assert "deadline budget 20 ms" in a.refusal(queued=10, idle=0, inflight=12, now=1.14, budget_ms=20)
