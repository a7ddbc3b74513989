"""Where the experiment arms live while a server runs, and how every process follows them.

Admin.SetArms reaches one worker (the front hands a call to any idle one). That worker checks
the update (engine.core.arms.config_with_arms: the config's own validator), serves it, and only
then publishes it on the board with the next version; every other worker, and every server
sharing the board, polls it between calls (Service.tick, <= POLL_S) and installs a newer
version. A refused update never reaches the board, so the running arms keep serving everywhere.

Boards, by feature store:
- embedded: `arms.json` in the server's shared store folder (its workers share it; another
  server has its own, as it has its own feature state);
- Redis (one server or a cluster): one hash key beside the store's meta keys, so every server
  on that Redis converges; the version is bumped by a script, atomically;
- no shared folder (a single in-process engine): in memory.
A restarted worker starts on the board's arms, like it starts on CURRENT's bundle.
"""
from __future__ import annotations

import fcntl
import logging
import threading
from pathlib import Path
from typing import Protocol

import grpc

from engine.app.reloader import write_atomic
from engine.core.arms import ArmSpec, Arms, config_with_arms, from_config, parse_value, toml_value
from engine.core.config import Config, ConfigError
from protos import pb2

log = logging.getLogger("recserve.arms")

REDIS_KEY = "meta:{g}:arms"
FILE = "arms.json"


class StaleVersion(Exception):
    """SetArms named an expect_version that is no longer the one serving."""

    def __init__(self, expect: int, now: int):
        super().__init__(f"expect_version {expect}, but version {now} serves")


class Board(Protocol):
    def version(self) -> int:
        """The version on the board (0: none yet): what a follower polls, cheaper than `read`."""
    def read(self) -> Arms | None: ...
    def publish(self, arms: Arms, expect: int | None) -> Arms:
        """Store `arms` under the next version (returned); StaleVersion unless `expect` is None or current."""
    def close(self) -> None: ...


class MemoryBoard:
    def __init__(self) -> None:
        self._arms: Arms | None = None
        self._lock = threading.Lock()

    def version(self) -> int:
        return self._arms.version if self._arms else 0

    def read(self) -> Arms | None:
        return self._arms

    def publish(self, arms: Arms, expect: int | None) -> Arms:
        with self._lock:
            now = self._arms.version if self._arms else 0
            if expect is not None and expect != now:
                raise StaleVersion(expect, now)
            self._arms = arms.with_version(now + 1)
            return self._arms

    def close(self) -> None:
        pass


class FileBoard:
    """`arms.json` in a folder the server's workers share; an flock serialises publishers."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / FILE
        self._seen: tuple[tuple[int, int], int] | None = None    # ((inode, mtime ns), version)

    def version(self) -> int:
        """Parses the file only when it was replaced (publish renames a new file over it)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return 0
        key = (st.st_ino, st.st_mtime_ns)
        if self._seen is None or self._seen[0] != key:
            cur = self.read()
            self._seen = (key, cur.version if cur else 0)
        return self._seen[1]

    def read(self) -> Arms | None:
        try:
            return Arms.from_json(self.path.read_bytes())
        except FileNotFoundError:
            return None

    def publish(self, arms: Arms, expect: int | None) -> Arms:
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cur = self.read()
            now = cur.version if cur else 0
            if expect is not None and expect != now:
                raise StaleVersion(expect, now)
            out = arms.with_version(now + 1)
            write_atomic(self.path, out.to_json())
            return out

    def close(self) -> None:
        pass


_PUBLISH = """
local now = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= now then return {-1, now} end
redis.call('HSET', KEYS[1], 'version', now + 1, 'body', ARGV[1])
return {now + 1, now}
"""


class RedisBoard:
    """One hash (version, body) in the Redis the feature store uses, in the store's meta slot."""

    def __init__(self, url: str):
        from engine.store.redis.keys import META_SLOT
        from engine.store.redis.topology import connect

        self.net, self.slot = connect(url), META_SLOT

    def _client(self):
        return self.net.client(self.net.node(self.slot))

    def version(self) -> int:
        return int(self._client().hget(REDIS_KEY, "version") or 0)

    def read(self) -> Arms | None:
        version, body = self._client().hmget(REDIS_KEY, ["version", "body"])
        if body is None:
            return None
        return Arms.from_json(body).with_version(int(version))

    def publish(self, arms: Arms, expect: int | None) -> Arms:
        body = arms.with_version(0).to_json()
        got, now = self._client().eval(_PUBLISH, 1, REDIS_KEY, body, "" if expect is None else str(expect))
        if int(got) < 0:
            raise StaleVersion(expect, now)
        return arms.with_version(int(got))

    def close(self) -> None:
        self.net.close()


def board_for(feature_store: str | None, store_dir: str | None) -> Board:
    """The board the workers of a server share: Redis for a Redis store, else the store folder."""
    from engine.store.factory import is_embedded

    if not is_embedded(feature_store):
        return RedisBoard(feature_store)
    return FileBoard(store_dir) if store_dir else MemoryBoard()


class Follower:
    """One process's side: the arms it serves, installing newer versions from the board."""

    def __init__(self, engine, base: Config, board: Board):
        self.engine, self.base, self.board = engine, base, board
        self.arms = from_config(base)
        self.refused = 0        # the newest board version this process could not serve (not retried)
        self.lock = threading.Lock()
        self.poll()

    def poll(self) -> None:
        """Install the board's arms if they are newer than ours. A record this process cannot
        serve (a server on another config sharing the Redis) is logged and skipped."""
        try:
            if self.board.version() <= self._known():
                return                       # the usual case: one small read, no body
            got = self.board.read()
        except Exception as e:   # noqa: BLE001 - an unreachable board leaves the running arms serving
            log.warning("cannot read the arms board: %s", e)
            return
        if got is None or got.version <= self._known():
            return
        with self.lock:
            if got.version <= self._known():
                return
            try:
                self.engine.set_arms(config_with_arms(self.base, got))
            except Exception as e:   # noqa: BLE001
                log.error("arms version %d refused here: %s; still serving version %d", got.version, e,
                          self.arms.version)
                self.refused = got.version    # GetArms keeps naming the version that serves
                return
            self.arms = got
            log.info("serving arms version %d: %s", got.version, describe(got))

    def _known(self) -> int:
        """The newest board version this process has dealt with: served, or refused."""
        return max(self.arms.version, self.refused)

    def set(self, arms: Arms, expect: int | None) -> Arms:
        """Validate (ConfigError), serve here (BundleError), then publish (StaleVersion)."""
        cfg = config_with_arms(self.base, arms)
        with self.lock:
            now = self.board.read()
            if expect is not None and expect != (now.version if now else 0):
                raise StaleVersion(expect, now.version if now else 0)
            old = self.engine.config
            self.engine.set_arms(cfg)
            try:
                self.arms = self.board.publish(arms, expect)
            except BaseException:
                self.engine.set_arms(old)
                raise
            return self.arms


def handle_set(f: Follower, m: pb2.SetArmsRequest, worker_id: int
               ) -> tuple[grpc.StatusCode | None, str, pb2.ArmsResponse | None]:
    """Admin.SetArms: (None, "", answer), or the refusal's status and reason: INVALID_ARGUMENT for
    an update the config validator refuses, FAILED_PRECONDITION for a stale expect_version or an
    arm whose pipeline fails its smoke request."""
    from engine.core.errors import BundleError

    try:
        got = f.set(from_proto(m), m.expect_version if m.HasField("expect_version") else None)
    except ConfigError as e:
        return grpc.StatusCode.INVALID_ARGUMENT, str(e), None
    except (BundleError, StaleVersion) as e:
        return grpc.StatusCode.FAILED_PRECONDITION, str(e), None
    return None, "", to_proto(got, f"version {got.version} serving here; the other workers and servers sharing "
                                   "the store follow within ~1 s", worker_id)


def describe(a: Arms) -> str:
    arms = ", ".join(f"{x.name} {x.share:g}" + (" capped" if x.cap else "") for x in a.arms) or "none"
    return f"arms {arms}" + (f"; control {a.control}" if a.control else "") + (f"; salt {a.salt!r}" if a.salt else "")


def from_proto(m: pb2.SetArmsRequest) -> Arms:
    """The request's arms with their TOML values parsed; ConfigError names a bad one."""
    arms = tuple(ArmSpec(a.name, a.share, {k: parse_value(f"arms.{a.name}.set.{k}", v) for k, v in a.set.items()},
                         a.cap) for a in m.arms)
    return Arms(0, arms, {k: parse_value(f"control.{k}", v) for k, v in m.control.items()}, m.salt)


def to_proto(a: Arms, message: str = "", worker_id: int = 0) -> pb2.ArmsResponse:
    try:
        return pb2.ArmsResponse(
            version=a.version, message=message, worker_id=worker_id,
            arms=[pb2.Arm(name=x.name, share=x.share, set={k: toml_value(v) for k, v in x.set.items()}, cap=x.cap)
                  for x in a.arms],
            control={k: toml_value(v) for k, v in a.control.items()}, salt=a.salt)
    except ConfigError as e:   # a config file's value TOML cannot carry back (never from SetArms)
        return pb2.ArmsResponse(version=a.version, message=f"{message}; {e}", worker_id=worker_id)
