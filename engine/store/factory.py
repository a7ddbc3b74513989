"""`--feature-store URL` -> the backend the engine builds a store with, for each bundle."""
from __future__ import annotations

from typing import Callable

from engine.core.bundle import Bundle
from engine.core.features import FeatureStore
from engine.store.embedded import EmbeddedStore


def is_embedded(url: str | None) -> bool:
    return url in (None, "", "embedded")


def store_factory(url: str | None, shared_dir: str | None = None, state_dir: str | None = None,
                  snapshot_s: float = 60.0, snapshot_writer: bool = True,
                  event_buffer: int = 100_000) -> Callable[[Bundle], FeatureStore]:
    """`--feature-store URL` -> what the engine calls for each bundle it builds a store for.

    None or "embedded": the embedded store (shared through `shared_dir`, persisted to
    `state_dir`: engine.store.statedir says which); redis://HOST:PORT/DB (or rediss://,
    unix://): the Redis store on one Redis; rediscluster://HOST:PORT,HOST:PORT,...: the Redis
    store on a Redis Cluster.
    """
    if is_embedded(url):
        return lambda b: EmbeddedStore(b, shared_dir, state_dir, snapshot_s, snapshot_writer)
    if url.split("://", 1)[0] in ("redis", "rediss", "unix", "rediscluster"):
        if state_dir:
            raise ValueError("--state-dir persists the embedded store; Redis persists itself "
                             "(docs/feature_store.md)")
        from engine.store.redis import RedisStore, parse_cluster_url

        if url.startswith("rediscluster://"):
            parse_cluster_url(url)   # a malformed node list fails at start, not in the first request
        return lambda b: RedisStore(b, url, event_buffer)
    raise ValueError(f"--feature-store {url!r}: expected 'embedded', redis://HOST:PORT/DB or "
                     "rediscluster://HOST:PORT,HOST:PORT,...")
