"""The sample log written by serving: the features as the rankers saw them, every acknowledged
list and event through a SIGKILL of the real server, both backends (files, Redis streams), the
joiner over what a real server wrote, and logging that fails open."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from helpers import REPO, wait_for
from redis_fixtures import redis_server  # noqa: F401 - module fixture
from test_store_durability import _Serve

from engine.app.samplelog import SampleLog
from engine.core.bundle import load_bundle
from engine.core.config import load_config
from engine.core.featurize import sequence_input
from engine.core.request import Request
from engine.core.runner import Engine
from engine.store.factory import store_factory
from engine.store.samplelog import records
from engine.store.samplelog.raw import raw_record
from engine.store.samplelog.source import SegmentLog
from engine.store.samplelog.streams import StreamLog
from model_export.join import Joiner
from model_export.joined import JoinedReader, JoinedWriter

pytestmark = pytest.mark.slow


def read_all(reader) -> list:
    cursor, out = {}, []
    while True:
        chunks, cursor, at_end = reader.poll(cursor)
        out += chunks
        if at_end:
            return out


def test_a_logged_sample_holds_the_features_the_rankers_saw(tiny_bundle, tiny_config, tmp_path):
    """In process: the fine ranker's and phase 2's feeds, captured as the engine calls them,
    equal the logged rows of the served items bit for bit (the sequence through the bundle)."""
    cfg = load_config(tiny_config)
    bundle = load_bundle(tiny_bundle)
    engine = Engine(cfg, bundle, make_store=store_factory(None))
    feeds: dict[str, dict] = {}
    run = engine.models.run

    def capture(name, inputs, **kw):
        feeds[name] = {k: np.array(v) for k, v in inputs.items()}
        return run(name, inputs, **kw)

    engine.models.run = capture
    kinds = {name: kind for name, (kind, _) in cfg.stage.items()}
    order = ["merge", *cfg.pipeline.stages]
    entering_stage = {model: order[order.index(next(n for n in cfg.pipeline.stages if kinds[n] == kind)) - 1]
                      for model, kind in (("fine", "rank_multitask"), ("coarse_dnn", "rank_dnn"))}
    entering: dict[str, np.ndarray] = {}
    log = SampleLog(cfg.log, tmp_path / "log")
    try:
        for user, ctx in (("u3", {"hour": 7, "device": 1}), ("new-user", {})):
            resp = engine.recommend(Request(user, count=8, context=ctx, request_id=f"r-{user}"),
                                    observer=lambda name, c: entering.update({name: c.item.copy()}))
            log.recommend(user, ctx, resp)
            log.flush()                           # the raw record's Arrow batch, now instead of within batch_ms
            batch = read_all(SegmentLog(tmp_path / "log", "impressions"))[-1].batch
            assert batch.column("item_id").to_pylist() == resp.item_ids
            fine = feeds["fine"]
            ux, ix = records.matrix(batch.column("user_x")), records.matrix(batch.column("item_x"))
            for model, stage in entering_stage.items():     # the model's input row of each served item
                row = {int(i): k for k, i in enumerate(entering[stage])}
                rows = [row[int(i)] for i in batch.column("item_index").to_pylist()]
                assert np.array_equal(ux, np.repeat(feeds[model]["user"], len(rows), axis=0)), model
                assert np.array_equal(ix, feeds[model]["item"][rows]), model
            seq, mask = sequence_input(bundle.tables, records.matrix(batch.column("recent"))[:1])
            assert np.array_equal(seq, fine["seq"]) and np.array_equal(mask, fine["seq_mask"])
            preds = batch.column("predictions").to_pylist()
            for k, t in enumerate(bundle.tasks):
                assert [dict(p)[t] for p in preds] == resp.task_scores[t].tolist()
        assert batch.column("user_index")[0].as_py() == -1       # the new user
    finally:
        log.close()
        engine.close()


def test_a_failing_log_never_fails_the_call(tmp_path):
    """The folder goes away under the writers: their next segment cannot be opened, the calls go
    on, the failures are counted."""
    import shutil

    from engine.core.sections import LogConfig
    from engine.core.request import Event, Response, ServedInputs

    n = 3
    resp = Response(["a", "b", "c"], np.ones(n, np.float32), {"click": np.full(n, 0.5, np.float32)}, [["ann"]] * n,
                    request_id="r1", bundle_version="v", inputs=ServedInputs(
                        np.arange(n, dtype=np.int32), 0, np.ones(4, np.float32), np.ones((n, 2), np.float32),
                        np.full(5, -1, np.int32), 1.0))
    log = SampleLog(LogConfig(segment_s=1e-9), tmp_path / "log")     # a new segment per record
    try:
        log.recommend("u1", {}, resp)
        log.events([Event("click", "u1", "a", 0.0, "r1")], set())
        assert log.stats()["impressions_ok"] == n and log.stats()["events_ok"] == 1
        shutil.rmtree(tmp_path / "log")
        log.imp.seg.rotate()                               # the segment was due: the next one has no folder
        log.recommend("u1", {}, resp)                      # no exception
        log.events([Event("click", "u1", "a", 0.0, "r1"), Event("like", "u1", "b", 0.0, "")], {1})
        st = log.stats()
        assert (st["impressions_failed"], st["events_failed"]) == (n, 1)
    finally:
        log.close()


def test_a_rotation_on_the_append_path_leaves_the_disk_to_the_sync_thread(tmp_path, monkeypatch):
    """Appends that rotate only swap files: no fsync on the caller's thread; the old segment stays
    locked (live to readers) until the thread's pass fsyncs and closes it, then it reads whole."""
    import os

    from engine.store.samplelog.segments import SegmentFile, SegmentWriter, locked

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    w = SegmentWriter(tmp_path, records.EVENTS, segment_bytes=1, fsync_s=3600)   # a new segment per record
    try:
        batch = records.encode(records.event_batch(1.0, ["click"], ["u1"], ["a"], ["r1"], [0.0]))
        names = [w.append(batch)[0] for _ in range(3)]
        assert len(set(names)) == 3 and synced == []
        assert all(locked(tmp_path / n) for n in names)     # rotated out, not closed yet
        w.sync()
        assert len(synced) == 4                            # two closed segments, the open one, the folder
        assert [locked(tmp_path / n) for n in names] == [False, False, True]
        for n in names[:2]:
            f = SegmentFile(tmp_path / n)
            got, _, torn = f.records(0)
            f.close()
            assert len(got) == 1 and torn == 0
    finally:
        w.close()
    assert not locked(tmp_path / names[2])


def _rows(log_dir: Path) -> dict[str, list[dict]]:
    """request_id -> its logged rows, in served order; a request logged twice fails here."""
    out: dict[str, list[dict]] = {}
    for c in read_all(SegmentLog(log_dir, "impressions")):
        for r in c.batch.to_pylist():
            if r["position"] == 0:
                assert r["request_id"] not in out, r["request_id"]
                out[r["request_id"]] = []
            out[r["request_id"]].append(r)
    return out


def test_the_server_logs_every_acknowledged_list_through_a_sigkill(tiny_bundle, tiny_config, tmp_path):
    log_dir = tmp_path / "log"
    server = _Serve(tmp_path, tiny_config, tiny_bundle, "--workers", "2", "--state-dir", "none",
                    "--set", f'log.dir="{log_dir}"', "--set", "log.segment_s=0.5")
    acked: dict[str, list[str]] = {}
    answers: dict[str, object] = {}
    try:
        pids = set()                             # the workers that answered; the load below reaches both
        for k in range(8):
            with server.client() as c:
                r = c.recommend(f"u{k}", count=6, context={"hour": 3})
            assert len(r.request_id) == 32       # created for a request that had none
            acked[r.request_id] = [it.item_id for it in r.items]
            answers[r.request_id] = r
            pids.add(r.served_by.rsplit("/", 1)[1])
        with server.client() as c:
            mine = c.recommend("u1", count=5, request_id="mine")
            assert mine.request_id == "mine"
            acked["mine"] = [it.item_id for it in mine.items]
            assert c.report_events([{"kind": "click", "user_id": "u1", "item_id": acked["mine"][1],
                                     "request_id": "mine"},
                                    {"kind": "like", "user_id": "u1", "item_id": acked["mine"][2]}]).accepted == 2
        stop, lock = threading.Event(), threading.Lock()

        def load(k: int) -> None:
            with server.client() as c:
                n = 0
                while not stop.is_set():
                    try:
                        r = c.recommend(f"load-{k}-{n % 7}", count=4)
                    except grpc.RpcError:
                        return                    # the server is gone: not acknowledged
                    with lock:
                        acked[r.request_id] = [it.item_id for it in r.items]
                        pids.add(r.served_by.rsplit("/", 1)[1])
                    n += 1

        threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(2.0)                           # a few rotations (segment_s 0.5) meanwhile
        server.kill()                             # SIGKILL, parent and workers, under load
        stop.set()
        for t in threads:
            t.join()
    finally:
        if server.proc.poll() is None:
            server.kill()
    segments = sorted((log_dir / "impressions").glob("*.seg"))
    assert {p.name.split("-")[2] for p in segments} == pids and len(pids) == 2   # each worker its own
    logged = _rows(log_dir)
    assert len(acked) > 40
    missing = [rid for rid in acked if rid not in logged]
    assert not missing, f"{len(missing)} acknowledged lists not in the log"
    for rid, items in acked.items():
        assert [r["item_id"] for r in logged[rid]] == items
    events = [r for c in read_all(SegmentLog(log_dir, "events")) for r in c.batch.to_pylist()]
    assert [(e["kind"], e["request_id"]) for e in events] == [("click", "mine"), ("like", "")]

    # what was logged reproduces what was served: the bundle's fine ranker on the logged inputs
    bundle = load_bundle(tiny_bundle)
    sess = ort.InferenceSession(str(bundle.path / "models" / "fine.onnx"), providers=["CPUExecutionProvider"])
    for rid in list(answers)[:3]:
        rows = logged[rid]
        served = {it.item_id: it for it in answers[rid].items}
        recent = np.array([rows[0]["recent"]], np.int32)
        seq, mask = sequence_input(bundle.tables, recent)
        p = sess.run(None, {"user": np.array(rows[0]["user_x"], np.float32)[None],
                            "item": np.array([r["item_x"] for r in rows], np.float32), "seq": seq,
                            "seq_mask": mask})[0]
        for k, r in enumerate(rows):
            logged_p = dict(r["predictions"])
            for j, t in enumerate(bundle.tasks):
                assert logged_p[t] == pytest.approx(served[r["item_id"]].predictions[t], abs=0)
                assert p[k, j] == pytest.approx(logged_p[t], abs=1e-5)

    # the joiner over what the server wrote: `recserve join`, window 1 s, every window closed by now
    newest = max(rows[0]["time"] for rows in logged.values())
    time.sleep(max(0.0, newest + 1.0 + 1.5 - time.time()))       # window + the joiner's END_SLACK_S + margin
    out = tmp_path / "joined"
    run = subprocess.run([sys.executable, "-m", "engine.cli.main", "join", "--config", str(tiny_config),
                          "--log", str(log_dir), "--out", str(out), "--set", "join.window_s=1.0"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "join_rate" in run.stdout and "corrections 0" in run.stdout and "pending 0" in run.stdout
    joined = [r for t, _ in JoinedReader(out).read() for r in t.to_pylist()]
    assert len(joined) == sum(len(v) for v in logged.values())
    labels = {(r["request_id"], r["item_id"]): (r["label_click"], r["label_like"]) for r in joined}
    assert labels[("mine", acked["mine"][1])] == (1, 0)
    assert labels[("mine", acked["mine"][2])] == (0, 1)        # no request_id: joined by (user, item, time)
    assert sum(c + lk for c, lk in labels.values()) == 2


@pytest.mark.redis
def test_redis_streams_backend_and_fail_open(redis_server, tiny_bundle, tiny_config, tmp_path):  # noqa: F811
    url = redis_server.url(0) + "?prefix=t-log"
    server = _Serve(tmp_path, tiny_config, tiny_bundle, "--workers", "1", "--state-dir", "none",
                    "--set", 'log.backend="redis"', "--set", f'log.redis_url="{url}"')
    try:
        with server.client() as c:
            served = [c.recommend(f"u{k}", count=5) for k in range(3)]
            assert c.report_events([{"kind": "finish", "user_id": "u0", "item_id": served[0].items[0].item_id,
                                     "request_id": served[0].request_id}]).accepted == 1
            redis_server.stop()                   # Redis goes away: answers go on, entries are buffered
            during = c.recommend("u9", count=5)
            wait_for(lambda: c.status().counters.get("samplelog.impressions_buffered", 0) >= 1,
                     what="the buffered entry counted (GetStatus, refreshed every second)")
            redis_server.start()                  # back (empty: no persistence here): the buffer drains
            wait_for(lambda: redis_server.client().xlen("t-log:impressions") == 1, what="the buffered entry")
    finally:
        assert server.terminate() == 0
    imp = StreamLog(url, "impressions")
    got = [c.batch.column("request_id")[0].as_py() for c in read_all(imp)]
    assert got == [during.request_id]
    assert redis_server.client().xinfo_groups("t-log:impressions")[0]["name"] == b"joiner"


@pytest.mark.redis
def test_the_joiner_reads_redis_streams_exactly_once(redis_server, tmp_path):  # noqa: F811
    from engine.core.sections import JoinConfig
    from engine.store.samplelog.streams import StreamWriter

    url = redis_server.url(0) + "?prefix=t-join"
    imp, ev = StreamWriter(url, "impressions", 1000, raw=True), StreamWriter(url, "events", 1000)
    t0 = time.time() - 100
    for k in range(4):
        imp.append(raw_record(
            request_id=f"r{k}", time=t0 + k, user_id="u1", user_index=0, item_ids=["a", "b"], items=np.arange(2),
            experiment="", bundle_version="v", routes=[["ann"]] * 2, scores=np.ones(2), predictions={},
            context={}, degraded=False, now_days=0.0, user_x=np.ones(2, np.float32), item_x=None,
            recent=np.full(3, -1, np.int32)))
    ev.append(records.encode(records.event_batch(t0 + 5, ["click"], ["u1"], ["b"], ["r2"], [0.0])))
    cfg = JoinConfig(window_s=10.0, commit_s=1e9)
    out = tmp_path / "out"
    j = Joiner(cfg, StreamLog(url, "impressions"), StreamLog(url, "events"), JoinedWriter(out))
    j.step()
    j.commit()
    j.out.close()
    assert j.stats.impressions == 8 and j.stats.positives == 1
    pending = redis_server.client().xpending("t-join:impressions", "joiner")["pending"]
    assert pending == 0                           # acknowledged once committed
    ev.append(records.encode(records.event_batch(time.time(), ["click"], ["u1"], ["a"], ["r0"], [0.0])))
    j2 = Joiner(cfg, StreamLog(url, "impressions"), StreamLog(url, "events"), JoinedWriter(out))
    j2.step()
    j2.commit()
    j2.out.close()
    rows = [r for t, _ in JoinedReader(out).read() for r in t.to_pylist()]
    assert len([r for r in rows if not r["correction"]]) == 8      # nothing read twice after the restart
    assert [(r["request_id"], r["item_id"]) for r in rows if r["correction"]] == [("r0", "a")]
    imp.close()
    ev.close()
