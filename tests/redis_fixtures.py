"""Real redis-server processes on loopback for the Redis feature store tests (no mocks).

`RedisServer`: one standalone server. `LocalCluster`: a 3-master Redis Cluster (no replicas)
built with `redis-cli --cluster create`. Both run without persistence (`--save ''
--appendonly no`) in a tmp dir, so a stopped and restarted server comes back empty, the
worst case for the store. redis-server is installed with apt-get when missing (as root).

The cluster nodes run with `cluster-require-full-coverage no` (what docs/feature_store.md
recommends for a cluster without replicas): the other shards keep answering while one master
is down, so the tests can tell "users on the down shard" from "everybody".
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from engine.app.ready import free_port


def redis_server_binary() -> str:
    """redis-server from PATH; installed with apt-get when missing and running as root."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("redis-server is not installed and installing it needs root: apt-get install -y redis-server")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "redis-server"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True)
    return shutil.which("redis-server") or pytest.skip("apt-get install -y redis-server failed")


def redis_cli_binary() -> str:
    """redis-cli, from the same Debian package as redis-server (redis-tools)."""
    server = redis_server_binary()
    return shutil.which("redis-cli") or str(Path(server).with_name("redis-cli"))


class RedisServer:
    """One redis-server process without persistence; stop/start keep the port (and, for a
    cluster node, its nodes.conf: it rejoins the cluster with its slots, empty)."""

    def __init__(self, binary: str, workdir: Path, extra: tuple[str, ...] = ()):
        self.binary, self.dir, self.port, self.extra = binary, workdir, free_port(), extra
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), *self.extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise AssertionError(f"redis-server on port {self.port} did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running():
            os.kill(self.proc.pid, signal.SIGCONT)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db, socket_timeout=2)


class LocalCluster:
    """Three masters, no replicas, on loopback; `url()` is what --feature-store takes."""

    def __init__(self, workdir: Path, masters: int = 3):
        binary = redis_server_binary()
        self.nodes: list[RedisServer] = []
        self._owner: list[RedisServer] | None = None
        try:
            for _ in range(masters):
                port = free_port()
                d = workdir / f"node-{port}"
                d.mkdir()
                self.nodes.append(RedisServer(binary, d, (
                    "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-port", str(free_port()), "--cluster-node-timeout", "5000",
                    "--cluster-require-full-coverage", "no")))
            create = subprocess.run(
                [redis_cli_binary(), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)
            if create.returncode != 0:
                raise AssertionError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
            self.wait_ok()
        except BaseException:
            self.close()
            raise

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every node says cluster_state:ok and knows every master."""
        end = time.monotonic() + timeout
        while True:
            try:
                infos = [n.client().cluster("info") for n in self.nodes]   # parsed into a dict
                if all(i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == len(self.nodes) for i in infos):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > end:
                raise AssertionError("local Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def url(self) -> str:
        return "rediscluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def client(self) -> RedisCluster:
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in self.nodes if n.running()],
                            socket_timeout=2, require_full_coverage=False)

    def node_of(self, key: str) -> RedisServer:
        """The server holding `key`'s slot (the slot map is fixed: nodes restart with their slots)."""
        if self._owner is None:
            with self.client() as c:
                cache = c.nodes_manager.slots_cache
                ports = {int(cache[s][0].port) for s in cache}
                by_port = {n.port: n for n in self.nodes if n.port in ports}
                self._owner = [by_port[int(cache[s][0].port)] for s in range(16384)]
        return self._owner[redis.crc.key_slot(key.encode())]

    def reset(self) -> None:
        """Every master running (resumed or restarted) and empty."""
        for n in self.nodes:
            n.resume()
            if not n.running():
                n.start()
        self.wait_ok()
        self.flushall()

    def flushall(self) -> None:
        for n in self.nodes:
            n.client().flushall()

    def used_memory(self) -> int:
        return sum(int(n.client().info("memory")["used_memory"]) for n in self.nodes)

    def close(self) -> None:
        for n in self.nodes:
            if n.running():
                n.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> RedisServer:
    srv = RedisServer(redis_server_binary(), tmp_path_factory.mktemp("redis"))
    yield srv
    srv.stop()


_cluster: LocalCluster | None = None


@pytest.fixture(scope="session")
def redis_cluster(request, tmp_path_factory) -> LocalCluster:
    """One local cluster for the whole run (both Redis test modules), stopped at the end."""
    global _cluster
    if _cluster is None:
        _cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
        request.config.add_cleanup(_cluster.close)
    return _cluster


@pytest.fixture
def cluster(redis_cluster) -> LocalCluster:
    """The shared cluster, every master running and empty: each test starts from nothing."""
    redis_cluster.reset()
    return redis_cluster


_dbs = itertools.count(1)


@pytest.fixture
def db(redis_server) -> int:
    """A DB number of its own for each test (16 per server)."""
    return next(_dbs) % 16


@pytest.fixture(params=["redis", "rediscluster"])
def store_url(request) -> str:
    """A fresh standalone DB, or the (emptied) local cluster."""
    if request.param == "redis":
        return request.getfixturevalue("redis_server").url(request.getfixturevalue("db"))
    return request.getfixturevalue("cluster").url()


def user_state(store, bundle, user_id: str, index: int = -1):
    """A user's state from a store, with the bundle's default profile."""
    return store.user(user_id, index, bundle.tables.default_profile, bundle.tables.user_profile)


def median_recommend_ms(engine, requests: int = 200, warmup: int = 30) -> float:
    """Median in-process Recommend latency over known users; every answer must be undegraded."""
    from engine.core.request import Request

    for i in range(warmup):
        engine.recommend(Request(user_id=f"u{i}", count=20))
    ts = []
    for i in range(requests):
        t = time.perf_counter()
        resp = engine.recommend(Request(user_id=f"u{i % 50}", count=20))
        ts.append(time.perf_counter() - t)
        assert not resp.degraded
    return float(np.median(ts) * 1e3)
