"""Which node holds a slot, and a client per node: one Redis or a Redis Cluster.

Every command goes to one node's plain client with no client-side retries and follows no
redirection: redis-py's ClusterPipeline would re-send each failed command of a timed-out
pipeline on its own and re-read the slot map inline, so one request could wait several
timeouts. Here a request waits at most one timeout per node it contacts; the slot map is
re-read only by the store's background thread (`refresh`).
"""
from __future__ import annotations

import logging
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from engine.store.redis.keys import SLOTS

log = logging.getLogger("recserve.store")

SOCKET_TIMEOUT_S = 0.05     # request path: a slow Redis costs a request this much once, then fallback
BACKGROUND_TIMEOUT_S = 5.0  # seeding chunks, mirror loads and other big reads off the request path
ERRORS = (RedisError, RedisClusterException)


def _client(url: str, timeout: float) -> redis.Redis:
    """No client-side retries: a retry would multiply the timeout a request can wait."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(NoBackoff(), 0), health_check_interval=0)


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict]:
    """rediscluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...] -> startup nodes, client kwargs."""
    scheme, _, rest = url.partition("://")
    if scheme != "rediscluster" or not rest:
        raise ValueError(f"{url!r}: expected rediscluster://HOST:PORT[,HOST:PORT...]")
    kw: dict = {}
    if "@" in rest:
        cred, rest = rest.rsplit("@", 1)
        user, _, password = cred.rpartition(":")
        kw = {"password": unquote(password)} | ({"username": unquote(user)} if user else {})
    nodes = []
    for part in rest.rstrip("/").split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"{url!r}: {part!r} is not HOST:PORT")
        nodes.append((host.strip("[]"), int(port)))
    return nodes, kw


class Standalone:
    """One Redis: one node ("redis"); the store treats the whole DB as slot g."""

    cluster = False

    def __init__(self, url: str):
        self._fast, self._slow = _client(url, SOCKET_TIMEOUT_S), _client(url, BACKGROUND_TIMEOUT_S)

    def node(self, slot: int) -> str:
        return "redis"

    def client(self, node: str, slow: bool = False) -> redis.Redis:
        return self._slow if slow else self._fast

    def primaries(self) -> list[str]:
        return ["redis"]

    def slots(self, node: str) -> range:
        return range(SLOTS)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        self._fast.close()
        self._slow.close()


class Cluster:
    """A Redis Cluster through redis-py's RedisCluster, used for what it does well (topology:
    CLUSTER SLOTS, the slot map, one connection pool per node); commands go to a node's plain
    client, one pipeline per node, so the store decides about timeouts and retries. Two
    clients: 50 ms sockets for the request path, 5 s for seeding and big reads."""

    cluster = True

    def __init__(self, url: str):
        self._startup, self._kw = parse_cluster_url(url)
        self._fast: RedisCluster | None = None
        self._slow: RedisCluster | None = None
        try:
            self.refresh()
        except ERRORS as e:
            log.warning("redis cluster unreachable at start (%s)", e)

    def _make(self, timeout: float) -> RedisCluster:
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self._startup],
                            socket_timeout=timeout, socket_connect_timeout=timeout,
                            retry=Retry(NoBackoff(), 0), require_full_coverage=False, **self._kw)

    def refresh(self) -> None:
        """Re-read the slot map (background thread only). The request client's map is replaced
        only when it changed: a refresh drops the idle connections of the node it asked."""
        if self._slow is None:
            self._slow = self._make(BACKGROUND_TIMEOUT_S)
        else:
            self._slow.nodes_manager.initialize()
        if self._fast is None:
            self._fast = self._make(SOCKET_TIMEOUT_S)
        elif self._owners(self._fast) != self._owners(self._slow):
            self._fast.nodes_manager.initialize()

    @staticmethod
    def _owners(rc: RedisCluster) -> list:
        cache = rc.nodes_manager.slots_cache
        return [nodes[0].name if (nodes := cache.get(s)) else None for s in range(SLOTS)]

    def node(self, slot: int) -> str:
        if self._fast is None:
            raise redis.ConnectionError("no Redis Cluster node reached yet")
        nodes = self._fast.nodes_manager.slots_cache.get(slot)
        if not nodes:
            raise RedisClusterException(f"slot {slot} is not covered by the cluster")
        return nodes[0].name

    def client(self, node: str, slow: bool = False) -> redis.Redis:
        rc = self._slow if slow else self._fast
        n = rc.nodes_manager.nodes_cache.get(node) if rc is not None else None
        if n is None:
            raise redis.ConnectionError(f"{node} is not in the cluster's slot map")
        return rc.get_redis_connection(n)

    def primaries(self) -> list[str]:
        return [n.name for n in self._fast.get_primaries()] if self._fast is not None else []

    def slots(self, node: str) -> list[int]:
        cache = self._fast.nodes_manager.slots_cache
        return [s for s in range(SLOTS) if (nodes := cache.get(s)) and nodes[0].name == node]

    def close(self) -> None:
        for rc in (self._fast, self._slow):
            if rc is not None:
                rc.close()


Topology = Standalone | Cluster


def connect(url: str) -> Topology:
    return Cluster(url) if url.startswith("rediscluster://") else Standalone(url)
