"""Redis feature store: one live state shared by every server process and machine.

A standalone Redis (`redis://HOST:PORT/DB`, `rediss://`, `unix://`) or a Redis Cluster
(`rediscluster://[USER:PASSWORD@]HOST:PORT,HOST:PORT,...`), one key layout for both. The
modules split it by job; engine.store.redis.store composes them. docs/feature_store.md has
the design, the guarantees and the measurements.
"""
from engine.store.redis.store import RedisStore
from engine.store.redis.topology import parse_cluster_url

__all__ = ["RedisStore", "parse_cluster_url"]
