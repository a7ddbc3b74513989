"""The real server as a subprocess (`python -m engine.cli.main serve`) on the tiny bundle.

Needs the session fixtures `tiny_bundle` (bundle root: CURRENT + version folders) and
`tiny_config` (configs/tiny.toml) from conftest.py. Servers are module-scoped where the
tests don't disturb each other; test_reload.py has the two-worker server whose bundle root
the tests rewrite.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from helpers import OWN_CONNECTION, REPO, READY_TIMEOUT_S, TOKEN, Server, copy_bundle, publish_copy, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.app.ready import NotReady, Ready, free_port, parse_ready, print_ready, wait_ready
from engine.app.client import add_events_args, add_recommend_args, main_events, main_recommend
from engine.core.config import load_config
from protos import pb2, pb2_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg(tiny_config):
    return load_config(tiny_config)


@pytest.fixture(scope="module")
def one(tmp_path_factory, tiny_config, tiny_bundle):
    """One worker, with a token and metrics."""
    port = free_port()
    s = Server(tmp_path_factory.mktemp("one"), tiny_config, tiny_bundle, workers=1,
               extra=("--token", TOKEN, "--metrics-port", str(port)))
    s.metrics_port = port
    yield s
    assert s.terminate() == 0, s.stderr()


def test_recommend_round_trip(one, cfg):
    with one.client() as c:
        r = c.recommend("u1", count=5, debug=True, request_id="req-1")
        plain = c.recommend("u1")
    ids = [it.item_id for it in r.items]
    assert len(ids) == 5 and len(set(ids)) == 5
    for it in r.items:
        assert it.predictions and all(0 <= p <= 1 for p in it.predictions.values())
        assert it.routes
    assert r.bundle_version == one.version and r.request_id == "req-1"
    assert r.trace and all(t.name and t.ms >= 0 for t in r.trace) and r.total_ms > 0
    assert len(plain.items) == cfg.serving.default_count and not plain.trace


@pytest.mark.parametrize("kwargs, field", [
    ({"user_id": ""}, "user_id"),
    ({"count": -1}, "count"),
    ({"count": "max+1"}, "count"),
    ({"exclude": "max+1"}, "exclude_item_ids"),
    ({"experiment": "no-such-experiment"}, "experiment"),
])
def test_bad_input_names_the_field(one, cfg, kwargs, field):
    req = {"user_id": "u1", **kwargs}
    if req.get("count") == "max+1":
        req["count"] = cfg.serving.max_count + 1
    if req.get("exclude") == "max+1":
        req["exclude"] = [f"x{i}" for i in range(cfg.serving.max_excludes + 1)]
    with one.client() as c, pytest.raises(grpc.RpcError) as e:
        c.recommend(**req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


def test_token_guards_events_and_admin_only(one):
    for token in (None, "wrong"):
        with one.client(token=token) as c:
            assert c.recommend("u1", count=1).items
            for call in (lambda: c.report_events([{"kind": "click", "user_id": "u1", "item_id": "x"}]),
                         c.status, c.reload):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_impression_hides_a_served_item(one):
    with one.client() as c:
        first = c.recommend("u-events", count=10, request_id="r-ev").items[0].item_id
        r = c.report_events([{"kind": "impression", "user_id": "u-events", "item_id": first,
                              "timestamp": time.time(), "request_id": "r-ev"}])
        assert r.accepted == 1 and not r.rejected
        assert first not in [it.item_id for it in c.recommend("u-events", count=10).items]


def test_events_rejected_with_index_and_reason(one):
    with one.client() as c:
        item = c.recommend("u2", count=1).items[0].item_id
    ok = pb2.Event(kind=pb2.EVENT_KIND_CLICK, user_id="u2", item_id=item)
    with grpc.insecure_channel(one.target) as ch:   # raw stub: the client refuses a bad kind itself
        r = pb2_grpc.RecServeStub(ch).ReportEvents(
            pb2.ReportEventsRequest(events=[ok, pb2.Event(user_id="u2", item_id=item), ok]),
            metadata=[("authorization", f"Bearer {TOKEN}")], timeout=5)
    assert r.accepted == 2
    assert [x.index for x in r.rejected] == [1] and "kind" in r.rejected[0].reason


def test_cli_commands(one, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_recommend_args(sub.add_parser("recommend"))
    add_events_args(sub.add_parser("events"))
    conn = ["--target", one.target, "--token", TOKEN]
    assert main_recommend(parser.parse_args(["recommend", *conn, "--user", "u-cli", "--count", "3", "--debug"])) == 0
    out = capsys.readouterr().out
    item = out.splitlines()[1].split()[1]
    assert "rank" in out and f"bundle {one.version}" in out and "rerank" in out
    args = parser.parse_args(["events", *conn, "--user", "u-cli", "--kind", "click", "--item", item, "--item", ""])
    assert main_events(args) == 1
    out = capsys.readouterr().out
    assert out.startswith("accepted 1, rejected 1") and "#1 " in out


def test_status_reports_the_worker(one):
    with one.client() as c:
        s = c.status()
    assert s.bundle_version == one.version and s.worker_id == 0 and s.pid != one.proc.pid
    assert s.uptime_s > 0 and s.counters["rss_bytes"] > 10_000_000


def test_health_and_reflection(one):
    with grpc.insecure_channel(one.target) as ch:
        _check_health_and_reflection(ch)


def _check_health_and_reflection(ch: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(ch)
    for service in ("", "recserve.v1.RecServe"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    [resp] = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert {"recserve.v1.RecServe", "recserve.v1.Admin", "grpc.health.v1.Health"} <= names
    [resp] = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="recserve.v1.RecServe")]), timeout=5))
    assert resp.file_descriptor_response.file_descriptor_proto


def test_metrics_endpoint(one):
    with one.client() as c:
        c.recommend("u-metrics", count=3)
        c.report_events([{"kind": "click", "user_id": "u-metrics", "item_id": "x"}])
        with pytest.raises(grpc.RpcError):
            c.recommend("u-metrics", count=-1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{one.metrics_port}/metrics", timeout=5).read().decode()
    for series in ('recserve_requests_total{code="OK",method="Recommend"}',
                   'recserve_requests_total{code="INVALID_ARGUMENT",method="Recommend"}',
                   'recserve_request_seconds_bucket{le="0.01",method="Recommend"}',
                   "recserve_stage_seconds_bucket{", "recserve_stage_candidates_total{",
                   'recserve_events_total{result="accepted"}', "recserve_degraded_responses_total",
                   f'version="{one.version}"', "recserve_worker_rss_bytes{"):
        assert series in text, series


def test_sigterm_drains_in_flight_calls(tmp_path, tiny_config, tiny_bundle):
    # Spawned workers import the parent's main script, so this patch reaches them too.
    script = tmp_path / "slow_serve.py"
    script.write_text(textwrap.dedent(f"""\
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        import engine.core.runner

        _recommend = engine.core.runner.Engine.recommend

        def _slow(self, req):
            if req.request_id == "slow":
                time.sleep(3)
            return _recommend(self, req)

        engine.core.runner.Engine.recommend = _slow

        if __name__ == "__main__":
            from engine.cli.main import main
            sys.exit(main())
        """))
    server = Server(tmp_path, tiny_config, tiny_bundle, entry=(str(script),))
    try:
        result: dict[str, object] = {}

        def slow_call() -> None:
            with server.client() as c:
                try:
                    result["resp"] = c.recommend("u1", count=3, request_id="slow", timeout=30)
                except grpc.RpcError as e:
                    result["err"] = f"{e.code().name}: {e.details()}"

        t = threading.Thread(target=slow_call)
        t.start()
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)

        def refuses_new_connections() -> bool:
            with server.client(options=OWN_CONNECTION) as c:
                try:
                    c.recommend("u1", count=1, timeout=0.5)
                except grpc.RpcError as e:
                    return e.code() == grpc.StatusCode.UNAVAILABLE
            return False

        wait_for(refuses_new_connections, timeout=5, what="the listener to close")
        assert t.is_alive(), "the slow call should still be in flight"
        t.join(30)
        assert "resp" in result, result.get("err")
        assert len(result["resp"].items) == 3
        assert server.proc.wait(30) == 0, server.stderr()
    finally:
        server.kill()


@pytest.mark.parametrize("case", ["missing bundle", "missing bundle, no config", "broken bundle", "bad config",
                                  "no config, bundle without one"])
def test_bad_start_exits_with_one_line(tmp_path, tiny_config, tiny_bundle, case):
    config, bundle, expect = tiny_config, tiny_bundle, ""
    if case.startswith("missing bundle"):
        bundle, expect = tmp_path / "no-such-bundle", "no-such-bundle"
        config = config if case == "missing bundle" else None
    elif case == "broken bundle":
        bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
        publish_copy(bundle, "broken", corrupt=True)
    elif case == "bad config":
        config, expect = tmp_path / "bad.toml", "no_such_key"
        config.write_text("[serving]\nno_such_key = 1\n")
    else:     # built before bundles carried their config
        bundle, config, expect = copy_bundle(tiny_bundle, tmp_path / "bundle"), None, "pass --config or rebuild"
        manifest = bundle / (bundle / "CURRENT").read_text().strip() / "manifest.json"
        m = json.loads(manifest.read_text())
        del m["config"]["file"]
        manifest.write_text(json.dumps(m))
    p = subprocess.run([sys.executable, "-m", "engine.cli.main", "serve", *(("--config", str(config)) if config else ()),
                        "--bundle", str(bundle), "--port", "0", "--workers", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=READY_TIMEOUT_S)
    assert p.returncode != 0 and not any(parse_ready(line) for line in p.stdout.splitlines())
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("recserve serve: ") and expect in lines[0]


def test_serve_from_another_folder_uses_the_bundle_config(tmp_path, tiny_bundle):
    """No --config and not run from the repository: the bundle's own config and side files."""
    s = Server(tmp_path, None, tiny_bundle.absolute(), workers=1, cwd=tmp_path)
    try:
        with s.client() as c:
            items = [it.item_id for it in c.recommend("someone-new", count=10).items]
        assert "i10" in items       # configs/whitelist_tiny.toml pins it to the final list
    finally:
        assert s.terminate() == 0, s.stderr()


def test_ready_line_round_trip(capsys):
    print_ready("127.0.0.1:5", workers=2, bundle="v1")
    r = parse_ready(capsys.readouterr().out)
    assert r == Ready("recserve", "127.0.0.1:5", {"workers": "2", "bundle": "v1"})
    assert (r.workers, r.version) == (2, "v1") and parse_ready(r.line) == r
    assert parse_ready("baseline serving on h:1") is None
    assert parse_ready("baseline serving on h:1", "baseline").target == "h:1"
    assert parse_ready("recserve serve: cannot bind 127.0.0.1:1") is None


def test_wait_ready_skips_other_lines_and_reports_an_early_exit():
    ready = "print('warming up'); print('recserve serving on 127.0.0.1:9 workers=1 bundle=v', flush=True)"
    ok = subprocess.Popen([sys.executable, "-c", f"{ready}; import time; time.sleep(60)"],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert wait_ready(ok, READY_TIMEOUT_S).target == "127.0.0.1:9"
    finally:
        ok.kill()
        ok.wait()
    dead = subprocess.Popen([sys.executable, "-c", "print('no'); raise SystemExit(3)"], stdout=subprocess.PIPE,
                            text=True)
    with pytest.raises(NotReady) as e:
        wait_ready(dead, READY_TIMEOUT_S)
    assert e.value.returncode == 3 and "exited with code 3" in str(e.value)


def test_overload_answers_resource_exhausted_at_once(tmp_path, tiny_config, tiny_bundle):
    """Beyond serving.max_inflight a call is refused immediately, never queued without bound."""
    for f in tiny_config.parent.glob("*list_tiny.toml"):
        shutil.copy(f, tmp_path / f.name)
    cfg = tmp_path / "tiny-max1.toml"
    cfg.write_text(tiny_config.read_text().replace("[serving]\n", "[serving]\nmax_inflight = 1\n", 1))
    s = Server(tmp_path, cfg, tiny_bundle, workers=1)
    try:
        codes: list[grpc.StatusCode] = []
        lock = threading.Lock()

        def hammer(i: int) -> None:
            with s.client(options=OWN_CONNECTION) as c:
                for n in range(15):
                    try:
                        c.recommend(f"u{i}-{n}", count=10)
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as e:
                        code = e.code()
                        # refused by admission (the front, before any queue), not cut by a deadline
                        assert e.details().startswith("overloaded:"), e.details()
                    with lock:
                        codes.append(code)

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 0 and codes.count(grpc.StatusCode.OK) > 0
    finally:
        s.terminate()


def test_the_native_server_never_imports_ray_or_torch():
    """Ray is the optional `ray` extra and torch the `train` extra: serving must not need them."""
    code = ("import sys, engine.cli.main, engine.app.server, engine.app.service, engine.core.runner, engine.store.redis, stages; "
            "bad = [m for m in ('ray', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
