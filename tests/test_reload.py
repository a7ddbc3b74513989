"""Two workers on a private bundle root: shared feature state, hot reload through CURRENT,
and the answers of Admin.ReloadBundle (a refusal is a non-OK status with the reason)."""
from __future__ import annotations

import argparse
import threading
import time

import grpc
import pytest
from helpers import OWN_CONNECTION, TOKEN, Server, copy_bundle, point, publish_copy, wait_for, worker_status

from engine.app.client import add_reload_args, main_reload
from engine.core.bundle import resolve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two(tmp_path_factory, tiny_config, tiny_bundle):
    """Two workers on a private bundle copy whose CURRENT the tests rewrite."""
    tmp = tmp_path_factory.mktemp("two")
    s = Server(tmp, tiny_config, copy_bundle(tiny_bundle, tmp / "bundle"), workers=2, extra=("--token", TOKEN))
    s.root = tmp / "bundle"
    yield s
    assert s.terminate() == 0, s.stderr()


def _current(server: Server) -> str:
    return (server.root / "CURRENT").read_text().strip()


def _reload_cli(server: Server, *argv: str) -> int:
    p = argparse.ArgumentParser()
    add_reload_args(p)
    return main_reload(p.parse_args(["--target", server.target, "--token", TOKEN, *argv]))


def test_two_workers_both_serve(two):
    status = worker_status(two)
    assert len(status) == 2, f"only pids {list(status)} answered"
    assert {s.worker_id for s in status.values()} == {0, 1}
    assert all(s.bundle_version == two.version for s in status.values())


def test_an_event_reaches_every_worker(two):
    """The embedded store's arrays are shared files: what one worker learns, all serve."""
    with two.client() as c:
        served = [it.item_id for it in c.recommend("u-shared", count=10).items]
        hidden = [x for x in served if x != "i10"][:5]   # i10 is pinned to the final list
        assert c.report_events([{"kind": "impression", "user_id": "u-shared", "item_id": x}
                                for x in hidden]).accepted == len(hidden)
    pids = set()
    for _ in range(40):
        with two.client(options=OWN_CONNECTION) as c:
            pids.add(c.status().pid)
            again = {it.item_id for it in c.recommend("u-shared", count=10).items}
        assert not again & set(hidden)
    assert len(pids) == 2


def test_hot_reload_under_load_drops_nothing(two):
    new = f"reload-{time.monotonic_ns()}"
    stop, errors, versions = threading.Event(), [], set()

    def hammer(i: int) -> None:
        with two.client(options=OWN_CONNECTION) as c:
            while not stop.is_set():
                try:
                    versions.add(c.recommend(f"load-{i}", count=5).bundle_version)
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        publish_copy(two.root, new)
        wait_for(lambda: {s.bundle_version for s in worker_status(two).values()} == {new},
                  what=f"every worker to serve {new}")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    assert new in versions


def test_broken_bundle_is_refused_and_old_keeps_serving(two, capsys):
    serving = (two.root / "CURRENT").read_text().strip()
    before = {pid: s.counters["reloads_refused"] for pid, s in worker_status(two).items()}
    bad = f"broken-{time.monotonic_ns()}"
    publish_copy(two.root, bad, corrupt=True)
    try:
        wait_for(lambda: all(s.counters["reloads_refused"] == before[pid] + 1
                              for pid, s in worker_status(two).items()), what="every worker to refuse")
        time.sleep(2.5)      # several polls later: refused once, not retried every second
        status = worker_status(two)
        assert all(s.counters["reloads_refused"] == before[pid] + 1 for pid, s in status.items())
        assert all(s.bundle_version == serving for s in status.values())
        with two.client() as c:
            assert c.recommend("u1", count=3).bundle_version == serving
            with pytest.raises(grpc.RpcError) as e:
                c.reload(bad)           # asked directly: refused again, with the reason, as a status
            assert c.status().bundle_version == serving
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"reload of {bad} failed" in e.value.details() and "!= manifest" in e.value.details()
        assert f"still serving {serving}" in e.value.details()
        assert _reload_cli(two, bad) == 1
        err = capsys.readouterr().err
        assert f"recserve reload: FAILED_PRECONDITION: reload of {bad} failed" in err
    finally:
        point(two.root, serving)


@pytest.mark.parametrize("path, says", [
    ("v1\0../..", "contains a NUL byte"),
    ("", "empty; leave path unset to re-read CURRENT"),
    ("no-such-version", "not a version folder inside"),
    ("../..", "not a version folder inside"),
    ("/", "not a version folder inside"),
    ("checkpoints", "holds no manifest.json"),
    ("x" * 5000, "File name too long"),
])
def test_a_path_naming_no_version_folder_is_invalid_argument(two, path, says):
    serving = _current(two)
    with two.client() as c:
        with pytest.raises(grpc.RpcError) as e:
            c.reload(path)
        assert c.status().bundle_version == serving
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert says in e.value.details()
    assert _current(two) == serving


def test_reload_cli_reports_what_serves(two, capsys):
    serving = _current(two)
    assert _reload_cli(two, serving) == 0
    assert capsys.readouterr().out.strip() == f"already serving {serving} (bundle {serving})"
    assert _reload_cli(two) == 0          # no version: re-read CURRENT
    assert _reload_cli(two, "no-such-version") == 1
    assert "recserve reload: INVALID_ARGUMENT: path 'no-such-version': not a version folder" in capsys.readouterr().err


def test_a_server_on_one_version_folder_has_nothing_to_reload(tmp_path, tiny_config, tiny_bundle):
    s = Server(tmp_path, tiny_config, resolve(tiny_bundle), workers=1, extra=("--token", TOKEN))
    try:
        with s.client() as c:
            with pytest.raises(grpc.RpcError) as e:
                c.reload()
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "started on a version folder" in e.value.details()
    finally:
        assert s.terminate() == 0, s.stderr()
