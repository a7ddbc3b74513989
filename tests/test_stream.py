"""The streaming trainer on real parts: a real server writing a real sample log (segment files or
Redis streams) under traffic answered from the world's ground truth, `recserve join --follow`,
and `recserve train` processes publishing versions the server swaps in; kills of each part."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest
from helpers import REPO, wait_for
from redis_fixtures import RedisServer, redis_server_binary
from test_store_durability import _Serve

from engine.core.bundle import CURRENT, load_bundle, resolve
from engine.core.config import load_config
from engine.core.sections import DataConfig
from loadtest.simulate.arms import arm_root, spawn
from loadtest.simulate.report import journal
from loadtest.simulate.world import SimWorld
from model_export.data import load_dataset
from model_export.joined import JoinedReader
from model_export.stream.samples import digest
from model_export.world import TASKS

pytestmark = pytest.mark.slow

# small numbers, so a few seconds of traffic make several versions
FAST = ("--set", "stream.publish_s=1", "--set", "stream.min_rows=100", "--set", "stream.holdout_rows=200",
        "--set", "stream.min_holdout_positives=5", "--set", "stream.buffer_rows=256", "--set", "stream.poll_s=0.2")


@pytest.fixture(scope="module")
def world(tiny_bundle, tiny_config) -> SimWorld:
    cfg = load_config(tiny_config)
    ds = load_dataset(DataConfig(**load_bundle(tiny_bundle).manifest["config"]["data"]))
    return SimWorld(ds, cfg.stage["rerank"][1], active=200, seed=3)


class Traffic:
    """Simulated users against whichever server `target` names now: Recommend, then the
    impression and the drawn clicks, likes and finishes through ReportEvents quoting its
    request_id. Keeps what the server acknowledged."""

    def __init__(self, world: SimWorld, target: str):
        self.world, self.target = world, target
        self.lists: dict[str, list[str]] = {}           # request_id -> items, acknowledged
        self.events: list[tuple[str, str, str]] = []    # (request_id, item, kind), acknowledged
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from engine.app.client import RecServeClient

        rng = np.random.default_rng(0)
        ids = self.world.ds.user_ids
        index = {str(i): k for k, i in enumerate(self.world.ds.item_ids)}
        while not self._stop.is_set():
            u, ctx = self.world.user(rng)
            try:
                with RecServeClient(self.target, timeout=5) as c:
                    r = c.recommend(str(ids[u]), 10, ctx)
                    self.lists[r.request_id] = [it.item_id for it in r.items]
                    self.versions.add(r.bundle_version)
                    labels = self.world.respond(u, np.array([index[it.item_id] for it in r.items]), rng)
                    events = [("impression", p) for p in range(len(r.items))]
                    events += [(kind, p) for k, kind in enumerate(TASKS) for p in np.flatnonzero(labels[:, k])]
                    sent = [{"kind": kind, "user_id": str(ids[u]), "item_id": r.items[p].item_id,
                             "request_id": r.request_id} for kind, p in events]
                    if c.report_events(sent).accepted == len(sent):
                        self.events += [(r.request_id, e["item_id"], e["kind"]) for e in sent]
            except grpc.RpcError:
                time.sleep(0.05)          # the server is down or restarting: nothing acknowledged
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _recserve(log: Path, *args: str) -> subprocess.Popen:
    return spawn(log, *args, append=True)


def _journal(root: Path, event: str) -> list[dict]:
    return [e for e in journal(root) if e["event"] == event]


def _joined(out: Path) -> list[tuple[pa.Table, object]]:
    return list(JoinedReader(out).read())


def _served_log(tmp_path: Path, tiny_config: Path, root: Path, world: SimWorld, seconds: float) -> Path:
    """`seconds` of traffic to a real server, joined as it comes (window 1 s, a commit every 0.3 s)."""
    log_dir, out = tmp_path / "log", tmp_path / "joined"
    server = _Serve(tmp_path, tiny_config, root, "--workers", "1", "--state-dir", "none", "--set",
                    f'log.dir="{log_dir}"')
    join = None
    try:
        join = _recserve(tmp_path / "join.log", "join", "--config", str(tiny_config), "--log", str(log_dir), "--out",
                         str(out), "--follow", "--set", "join.window_s=1.0", "--set", "join.commit_s=0.3")
        traffic = Traffic(world, server.target)
        time.sleep(seconds)
        traffic.stop()
        wait_for(lambda: sum(t.num_rows for t, _ in _joined(out)) == sum(map(len, traffic.lists.values())),
                 timeout=60, what="every list joined")
    finally:
        server.kill()
        if join is not None:
            join.send_signal(signal.SIGTERM)
            assert join.wait(60) == 0
    assert len(traffic.lists) > 50
    return out


def test_the_trainer_refuses_a_worse_model_and_publishes_with_linked_files(world, tiny_bundle, tiny_config, tmp_path):
    base = resolve(tiny_bundle)
    root = arm_root(base, tmp_path / "bundle")
    joined = _served_log(tmp_path, tiny_config, root, world, 8.0)
    train = [sys.executable, "-m", "engine.cli.main", "train", "--bundle", str(root), "--joined", str(joined), *FAST,
             "--set", 'stream.models=["coarse_dnn", "fine"]']

    # a learning rate that wrecks the fine ranker: its held-out AUC falls, nothing is published
    run = subprocess.run([*train, "--set", "stream.lr=3.0", "--set", 'stream.models=["fine"]'], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    refused = _journal(root, "refused")
    assert refused and "refused a candidate" in run.stdout, run.stdout
    auc = refused[0]["auc"]["fine"]
    assert auc["candidate"]["click"] < auc["serving"]["click"] - 0.01
    assert (root / CURRENT).read_text().strip() == base.name
    assert not _journal(root, "published") and sorted(p.name for p in root.glob("v*")) == [base.name]

    # the same samples, trained sanely (any AUC accepted: this checks the publishing), then served
    run = subprocess.run([*train, "--set", "stream.auc_margin=1.0"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    published = _journal(root, "published")
    assert published, run.stdout
    v = load_bundle(root)                     # every file verified against the new manifest
    assert v.version == published[-1]["version"] != base.name
    assert v.manifest["stream"]["trained"] == ["coarse_dnn", "fine"]
    for rel in v.manifest["files"]:
        same = os.stat(v.path / rel).st_ino == os.stat(base / rel).st_ino
        assert same == (rel not in ("models/coarse_dnn.onnx", "models/fine.onnx")), rel   # linked unless retrained
    assert v.manifest["created_unix"] == load_bundle(base).manifest["created_unix"]        # the same feature clock
    ckpt = root / "checkpoints" / v.version
    assert {p.name for p in ckpt.iterdir()} >= {"coarse_dnn.pt", "fine.pt", "two_tower.pt", "models.json",
                                                 "optimizer.pt"}
    # what was trained: every sample once, but the freshest, held out for the next version's check
    commits = _joined(joined)
    trained = [t for t, c in commits if (c.offset.segment, c.offset.pos) <= _off(published[-1]["through"])]
    assert sum(e["rows"] for e in published) == sum(t.num_rows for t in trained)
    assert sum(t.num_rows for t, _ in commits) - sum(t.num_rows for t in trained) >= 200


def _off(d: dict) -> tuple[str, int]:
    return d["segment"], d["pos"]


def _redis(tmp_path: Path) -> RedisServer:
    d = tmp_path / "redis"
    d.mkdir()
    return RedisServer(redis_server_binary(), d, ("--appendonly", "yes", "--appendfsync", "always"))


@pytest.mark.redis
@pytest.mark.parametrize("backend", ["files", "redis"])
def test_no_acknowledged_sample_is_lost_or_trained_twice_through_kills(backend, world, tiny_bundle, tiny_config,
                                                                       tmp_path):
    """Traffic runs while the trainer, then the server are SIGKILLed and restarted, then Redis
    (the server's feature store, and with the Redis backend its sample log too) is restarted
    with its AOF: every acknowledged list and event ends up joined exactly once, and the
    published versions' inputs tile the joined output, each sample in exactly one version (or
    held out for the next), through every restart."""
    root = arm_root(resolve(tiny_bundle), tmp_path / "bundle")
    redis = _redis(tmp_path)
    if backend == "redis":
        spec = redis.url(0) + "?prefix=loop"
        log_args = ("--set", 'log.backend="redis"', "--set", f'log.redis_url="{spec}"')
    else:
        spec = str(tmp_path / "log")
        log_args = ("--set", f'log.dir="{spec}"', "--set", "log.segment_s=1.0")
    joined, logs = tmp_path / "joined", tmp_path / "logs"
    logs.mkdir()
    serve = ("--workers", "1", "--state-dir", "none", "--feature-store", redis.url(1), *log_args)
    server = _Serve(tmp_path, tiny_config, root, *serve)
    procs: dict[str, subprocess.Popen] = {}
    join_cmd = ("join", "--config", str(tiny_config), "--log", spec, "--out", str(joined), "--follow",
                "--set", "join.window_s=1.0", "--set", "join.commit_s=0.3")
    train_cmd = ("train", "--bundle", str(root), "--joined", str(joined), "--follow", *FAST,
                 "--set", "stream.auc_margin=1.0", "--set", 'stream.models=["coarse_dnn", "fine", "id_embeddings"]')
    traffic = None
    try:
        procs["join"] = _recserve(logs / "join.log", *join_cmd)
        joined.mkdir(exist_ok=True)
        procs["train"] = _recserve(logs / "train.log", *train_cmd)
        traffic = Traffic(world, server.target)
        wait_for(lambda: len(_journal(root, "published")) >= 1, timeout=120, what="a first version")
        time.sleep(1.0)                                   # trained past it, not yet published: then killed
        procs["train"].kill()
        procs["train"].wait()
        procs["train"] = _recserve(logs / "train.log", *train_cmd)
        server.kill()                                     # SIGKILL, the whole process group, under traffic
        server = _Serve(tmp_path, tiny_config, root, *serve)
        traffic.target = server.target
        time.sleep(1.0)
        redis.stop()                                      # answers go on; the store and the log buffer, the joiner retries
        time.sleep(1.0)
        redis.start()                                     # AOF: what it acknowledged is back
        n = len(_journal(root, "published"))
        wait_for(lambda: len(_journal(root, "published")) >= n + 2, timeout=120, what="versions after the kills")
        wait_for(lambda: any("-s" in v for v in traffic.versions), timeout=30, what="a streamed version served")
        traffic.stop()
        lists, events = dict(traffic.lists), list(traffic.events)

        def all_joined() -> bool:
            got = {t for table, _ in _joined(joined) for t in table["request_id"].to_pylist()}
            return set(lists) <= got
        wait_for(all_joined, timeout=60, what="every acknowledged list joined")
    finally:
        if traffic:
            traffic.stop()
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
        server.kill()
        redis.stop()

    commits = _joined(joined)
    rows = pa.concat_tables([t for t, _ in commits])
    first = rows.filter(pa.compute.invert(rows["correction"]))
    keys = list(zip(first["request_id"].to_pylist(), first["item_id"].to_pylist()))
    assert len(keys) == len(set(keys)), "a served row joined twice"
    served = set(keys)
    missing = [(rid, it) for rid, items in lists.items() for it in items if (rid, it) not in served]
    assert not missing and len(lists) > 50, f"{len(missing)} acknowledged impressions not joined"
    clicked = {(r, i) for r, i, c in zip(rows["request_id"].to_pylist(), rows["item_id"].to_pylist(),
                                         rows["label_click"].to_pylist()) if c}
    acked_clicks = {(r, i) for r, i, kind in events if kind == "click"}
    assert acked_clicks and acked_clicks <= clicked, f"{len(acked_clicks - clicked)} acknowledged clicks not joined"

    # the versions' inputs tile the joined output: each starts where the one before ended, and its
    # rows (digest) are exactly the joined rows between (or skipped by a refusal, with theirs)
    published = sorted(_journal(root, "published"), key=lambda e: e["seq"])
    assert [e["seq"] for e in published] == list(range(1, len(published) + 1))
    start = (("", 0))
    for e in published:
        assert _off(e["after"]) == start, f"version {e['seq']} does not start where {e['seq'] - 1} ended"
        span = [t for t, c in commits if start < (c.offset.segment, c.offset.pos) <= _off(e["through"])]
        refused = [s for s in e["skipped"] if s["kind"] == "refused"]
        assert e["rows"] + sum(s["rows"] for s in refused) == sum(t.num_rows for t in span)
        assert (int(e["digest"], 16) + sum(int(s["digest"], 16) for s in refused)) % (1 << 64) == \
            sum(digest(t) for t in span) % (1 << 64)
        start = _off(e["through"])
    starts = [x for x in (logs / "train.log").read_text().splitlines() if x.startswith("train: from")]
    assert len(starts) == 2 and "streamed, seq" in starts[1]       # the restart resumed from a published version
