"""Experiment arms replaced at run time on real servers (Admin.SetArms): a bad update is refused
whole with the validator's reason, every worker of a three-worker server converges on a good
one, responses and the sample log name the arm, and two servers sharing a Redis feature store
converge through it."""
from __future__ import annotations

import threading

import grpc
import pytest
from helpers import OWN_CONNECTION, TOKEN, Server, wait_for
from redis_fixtures import redis_server  # noqa: F401 - module fixture
from test_samplelog import read_all

from engine.cli.arms import read_arms_file
from engine.core.arms import ArmSpec, Arms, config_with_arms
from engine.core.config import load_config
from engine.core.pipelines import CAP_BURST
from engine.store.samplelog.source import SegmentLog

pytestmark = pytest.mark.slow

WORKERS = 3
WEIGHTS = {"stage.rerank.weights": {"click": 1.0, "like": 2.0, "finish": 0.1}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_config, tiny_bundle):
    tmp = tmp_path_factory.mktemp("arms")
    s = Server(tmp, tiny_config, tiny_bundle, workers=WORKERS,
               extra=("--token", TOKEN, "--state-dir", "none", "--set", f'log.dir="{tmp / "log"}"'))
    s.log_dir = tmp / "log"
    yield s
    assert s.terminate() == 0, s.stderr()


def _every_worker(server: Server, fn, tries: int = 200) -> dict[int, object]:
    """fn(client) over fresh connections until every worker answered (the front picks any idle one)."""
    seen: dict[int, object] = {}
    for _ in range(tries):
        with server.client(options=OWN_CONNECTION) as c:
            r = fn(c)
        seen[r.worker_id] = r
        if len(seen) == server.workers:
            break
    assert len(seen) == server.workers, f"only workers {sorted(seen)} answered"
    return seen


def _concurrent_recommends(server: Server, users: list[str]) -> list:
    """Recommend for every user from 6 threads at once, so every worker serves some."""
    out, lock = [], threading.Lock()

    def run(chunk: list[str]) -> None:
        with server.client(options=OWN_CONNECTION) as c:
            for u in chunk:
                r = c.recommend(u, count=5)
                with lock:
                    out.append((u, r))

    threads = [threading.Thread(target=run, args=(users[k::6],)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_bad_updates_are_refused_whole_and_the_running_arms_keep_serving(server):
    with server.client() as c:
        before = c.arms()
        cases = [
            ([("a", 0.7, {}), ("b", 0.6, {})], {}, "shares must be >= 0 and sum to <= 1"),
            ([("a", 0.1, {"stage.rerank.beam_widht": 2})], {}, "beam_widht: unknown key"),
            ([("a", 0.1, {"stage.rerank.weights": {"click": 1.0, "nope": 1.0}})], {}, "not in the bundle"),
            ([("a", 0.1, {}), ("a", 0.1, {})], {}, "named twice"),
            ([("a", float("nan"), {})], {}, "arms.a.share: must be a finite number"),
            ([("ok", 0.1, {})], {"serving.max_count": 5}, "only stage.* keys"),
        ]
        for arms, control, why in cases:
            with pytest.raises(grpc.RpcError) as e:
                c.set_arms(arms, control)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details(), e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.set_arms([("a", 0.1, {})], expect_version=before.version + 7)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with server.client(token="wrong") as c, pytest.raises(grpc.RpcError) as e:
        c.set_arms([("a", 0.1, {})])
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    states = _every_worker(server, lambda c: c.arms())
    assert {(r.version, tuple(a.name for a in r.arms)) for r in states.values()} == \
        {(before.version, tuple(a.name for a in before.arms))}


def test_every_worker_converges_and_responses_and_the_log_name_the_arm(server, tiny_config):
    cfg = load_config(tiny_config)
    with server.client() as c:
        v0 = c.arms().version
        r = c.set_arms([("heavy_like", 0.4, WEIGHTS), ("wide", 0.3, {"stage.rerank.beam_width": 6})],
                       expect_version=v0, salt="round-1")
    assert r.version == v0 + 1 and [a.name for a in r.arms] == ["heavy_like", "wide"]
    assert r.arms[0].set["stage.rerank.weights"].replace(" ", "") == '{"click"=1.0,"like"=2.0,"finish"=0.1}'
    wait_for(lambda: {s.version for s in _every_worker(server, lambda c: c.arms()).values()} == {r.version},
             timeout=10, what="every worker on the new arms")

    arms = (ArmSpec("heavy_like", 0.4, WEIGHTS), ArmSpec("wide", 0.3, {"stage.rerank.beam_width": 6}))
    expected = config_with_arms(cfg, Arms(0, arms, {}, "round-1"))
    unsalted = config_with_arms(cfg, Arms(0, arms))
    assert any(expected.experiment_for(f"user-{k}") != unsalted.experiment_for(f"user-{k}") for k in range(50))
    answers = _concurrent_recommends(server, [f"user-{k}" for k in range(240)])
    assert {r.served_by for _, r in answers} and len({r.served_by for _, r in answers}) == WORKERS
    for u, resp in answers:
        assert resp.experiment == expected.experiment_for(u), u
    assert {r.experiment for _, r in answers} == {"", "heavy_like", "wide"}

    # a request may pin a live arm; the replaced config arm is gone everywhere
    with server.client() as c:
        assert c.recommend("someone", count=3, experiment="wide").experiment == "wide"
        with pytest.raises(grpc.RpcError) as e:
            c.recommend("someone", count=3, experiment="greedy")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    served = {resp.request_id: resp.experiment for _, resp in answers}

    def logged() -> dict[str, str]:
        rows = {}
        for chunk in read_all(SegmentLog(server.log_dir, "impressions")):
            b = chunk.batch
            rows.update(zip(b.column("request_id").to_pylist(), b.column("experiment").to_pylist()))
        return rows

    wait_for(lambda: served.keys() <= logged().keys(), timeout=15, what="the lists in the sample log")
    got = logged()
    assert all(got[rid] == exp for rid, exp in served.items())


def test_a_capped_arm_never_serves_more_than_its_share(server, tiny_config):
    """Users drawn by activity can put far more lists in an arm than its hash share; a capped arm
    serves at most share * lists (+ CAP_BURST per worker) and its other users get control."""
    with server.client() as c:
        r = c.set_arms([("explore", 0.1, WEIGHTS, True)], salt="cap-1")
    assert [(a.name, a.cap) for a in r.arms] == [("explore", True)]
    wait_for(lambda: {s.version for s in _every_worker(server, lambda c: c.arms()).values()} == {r.version},
             timeout=10, what="every worker on the capped arm")
    cfg = config_with_arms(load_config(tiny_config), Arms(0, (ArmSpec("explore", 0.1, WEIGHTS, True),), {}, "cap-1"))
    heavy = [u for u in (f"user-{k}" for k in range(3000)) if cfg.experiment_for(u) == "explore"][:30]
    answers = _concurrent_recommends(server, heavy * 8)      # every list from a user hashed to the arm
    served = sum(resp.experiment == "explore" for _, resp in answers)
    assert {resp.experiment for _, resp in answers} == {"", "explore"}
    assert 0 < served <= 0.1 * len(answers) + CAP_BURST * WORKERS, served


def test_the_cli_file_format_is_the_config_format(tmp_path):
    f = tmp_path / "arms.toml"
    f.write_text('salt = "r7"\n[experiments.a]\nshare = 0.05\n'
                 'set = { "stage.rerank.weights" = { click = 1.0, like = 0.3 } }\ncap = true\n'
                 '[control]\n"stage.rerank.fusion" = "sum"\n')
    a = read_arms_file(f)
    assert a.arms == (ArmSpec("a", 0.05, {"stage.rerank.weights": {"click": 1.0, "like": 0.3}}, True),)
    assert a.control == {"stage.rerank.fusion": "sum"} and a.salt == "r7"
    f.write_text("[arms.a]\nshare = 0.1\n")
    with pytest.raises(ValueError, match="unknown table 'arms'"):
        read_arms_file(f)


def test_servers_sharing_a_redis_store_converge_through_it(tmp_path, tiny_config, tiny_bundle, redis_server):
    url = redis_server.url(3)
    servers = [Server(tmp_path, tiny_config, tiny_bundle, workers=2,
                      extra=("--token", TOKEN, "--feature-store", url, "--set", 'log.backend="off"'))
               for _ in range(2)]
    try:
        with servers[0].client() as c:
            r = c.set_arms([("heavy_like", 0.5, WEIGHTS)])
        for s in servers:
            wait_for(lambda s=s: {x.version for x in _every_worker(s, lambda c: c.arms()).values()} == {r.version},
                     timeout=10, what="both servers on the new arms")
        with servers[1].client() as c:
            assert c.recommend("u1", count=3, experiment="heavy_like").experiment == "heavy_like"
    finally:
        for s in servers:
            s.terminate()


def test_a_restarted_server_without_a_shared_store_starts_on_its_config(tmp_path, tiny_config, tiny_bundle):
    s = Server(tmp_path, tiny_config, tiny_bundle, workers=1, extra=("--set", 'log.backend="off"'))
    try:
        with s.client(token=None) as c:
            r = c.arms()
        assert r.version == 0 and [a.name for a in r.arms] == list(load_config(tiny_config).experiments)
    finally:
        s.terminate()


def test_a_board_version_this_process_cannot_serve_is_skipped_and_not_reported(tiny_config, tiny_bundle):
    """A server on another config sharing the board publishes arms this one cannot build: it keeps
    serving (and naming) its own version, does not retry the bad one, and installs the next good one."""
    from engine.app.arms import Follower, MemoryBoard
    from engine.core.bundle import load_bundle
    from engine.core.runner import Engine
    from engine.store.embedded import EmbeddedStore

    base = load_config(tiny_config)
    engine = Engine(base, load_bundle(tiny_bundle), make_store=EmbeddedStore)
    try:
        board = MemoryBoard()
        f = Follower(engine, base, board)
        before = f.arms
        board.publish(Arms(arms=(ArmSpec("a", 0.1, {"stage.no_such_stage.k": 5}),)), None)
        f.poll()
        assert f.arms == before and f.refused == 1 and engine.config.experiments.keys() == base.experiments.keys()
        good = board.publish(Arms(arms=(ArmSpec("b", 0.1, {"stage.rerank.beam_width": 2}),)), 1)
        f.poll()
        assert f.arms.version == good.version == 2 and set(engine.config.experiments) == {"b"}
    finally:
        engine.close()


def test_a_follower_polls_the_version_and_reads_the_body_only_when_it_changed(tmp_path):
    from engine.app.arms import FileBoard, MemoryBoard

    for board in (FileBoard(tmp_path), MemoryBoard()):
        assert board.version() == 0 and board.read() is None
        board.publish(Arms(arms=(ArmSpec("a", 0.1),)), None)
        reads, read = [], board.read
        board.read = lambda: reads.append(1) or read()
        assert [board.version() for _ in range(3)] == [1, 1, 1]
        assert len(reads) <= 1                          # the file board parses a replaced file once
        board.publish(Arms(arms=(ArmSpec("b", 0.2),)), 1)
        reads.clear()
        assert board.version() == 2 and board.read().arms[0].name == "b"
