"""Redis feature store: one live state shared by every server process and machine.

Key space (one Redis DB belongs to one recserve deployment; item fields and members are the
bundle's item indices, user keys the external user id, known or not):
    meta:bundle         bundle version whose state the DB holds
    meta:catalog        item and user id tables (sha256) and ring sizes that state is keyed by
    meta:seed           lock (SET NX semantics, expiring) of the server seeding the DB
    ev:<writer>         last event batch applied from one server process
    u:<user>:recent     list: last primary-task positives, most recent first (LPUSH + LTRIM)
    u:<user>:seen       list: last impressions
    u:<user>:n          hash: imp, pos
    item:imp, item:pos  hash: item index -> count
    item:hot            sorted set: item index -> sum of decay(t_event, t_ref) over positives

Seeding: the first server to find the DB empty (first start, or a Redis restarted without
persistence) or holding an older bundle over another catalog empties it and loads its
bundle's end-of-log state in pipelined chunks under the lock; the others wait until
meta:bundle names their version. A newer bundle over the same catalog adopts the DB as it
is, so events accepted since the last bundle survive a model update.

Faults: every request-path command has a 50 ms socket timeout and no client retries. A read
that fails, or finds the DB not holding this version, is answered from the bundle's state and
flagged (the engine marks the response degraded); the store then stays on the bundle's state
until a background thread reaches Redis again. Events that cannot be written are buffered in
order, up to a bound (then Overloaded), and flushed by that thread once the DB holds this
version again (re-seeding it first if it came back empty). A Lua script applies each batch
atomically and only if its sequence number is above the last one applied from this process,
so a batch whose reply was lost to a timeout is not applied twice when retried.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import uuid

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from engine.bundle import Bundle
from engine.context import UserFeatures
from engine.request import Overloaded
from engine.store import BundleClock, ResolvedEvent, catalog_id, new_user, state_user, top_hot
from engine.state import decay

log = logging.getLogger("recserve.store")

SOCKET_TIMEOUT_S = 0.05     # request path: a slow Redis costs a request this much once, then fallback
BACKGROUND_TIMEOUT_S = 5.0  # seeding chunks, hot list refreshes and other big reads off the request path
BIG_READ = 4096             # item_stats over more items than this is a background refresh
SEED_CHUNK = 1000           # users (or 10x items) per seeding pipeline
SEED_LOCK_MS = 30_000       # the seeder refreshes it per chunk; a crashed seeder's lock expires
SEED_WAIT_S = 120.0         # start-up waits this long for another server's seeding
RETRY_S = 0.2               # background reconnect / flush period
FLUSH_BATCHES = 16          # buffered batches per flush round trip
SEQ_TTL_S = 7 * 86400

META, LOCK, IMP, POS, HOT = "meta:bundle", "meta:seed", "item:imp", "item:pos", "item:hot"
CATALOG = "meta:catalog"

# ARGV: version, writer, seq, recent_len, seen_len, then per event: flags (1 impression,
# 2 primary positive), user id, item index, hot weight
_APPLY = """
if redis.call('GET', 'meta:bundle') ~= ARGV[1] then return -1 end
local seq_key = 'ev:' .. ARGV[2]
if tonumber(ARGV[3]) <= tonumber(redis.call('GET', seq_key) or '0') then return 0 end
redis.call('SET', seq_key, ARGV[3], 'EX', %d)
local rlen, slen = tonumber(ARGV[4]) - 1, tonumber(ARGV[5]) - 1
for i = 6, #ARGV, 4 do
  local flags, u, item = tonumber(ARGV[i]), 'u:' .. ARGV[i + 1] .. ':', ARGV[i + 2]
  if flags %% 2 == 1 then
    redis.call('LPUSH', u .. 'seen', item)
    redis.call('LTRIM', u .. 'seen', 0, slen)
    redis.call('HINCRBY', u .. 'n', 'imp', 1)
    redis.call('HINCRBY', 'item:imp', item, 1)
  end
  if flags >= 2 then
    redis.call('LPUSH', u .. 'recent', item)
    redis.call('LTRIM', u .. 'recent', 0, rlen)
    redis.call('HINCRBY', u .. 'n', 'pos', 1)
    redis.call('HINCRBY', 'item:pos', item, 1)
    redis.call('ZINCRBY', 'item:hot', ARGV[i + 3], item)
  end
end
return 1
""" % SEQ_TTL_S

# ARGV: version, token, lock ms, catalog id. Unless the DB already holds this or a newer
# version or another server is seeding it: a DB holding the same catalog is adopted as it
# is (live events since the last bundle are kept: nothing accepted is lost), any other is
# emptied and the seed lock taken. Atomic: nobody seeds twice.
_CLAIM = """
local cur = redis.call('GET', 'meta:bundle')
if (cur and cur >= ARGV[1]) or redis.call('EXISTS', 'meta:seed') == 1 then return 0 end
if cur and redis.call('GET', 'meta:catalog') == ARGV[4] then
  redis.call('SET', 'meta:bundle', ARGV[1])
  return 2
end
redis.call('FLUSHDB')
redis.call('SET', 'meta:seed', ARGV[2], 'PX', ARGV[3])
return 1
"""


def _client(url: str, timeout: float) -> redis.Redis:
    """No client-side retries: a retry would multiply the timeout a request can wait."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(NoBackoff(), 0), health_check_interval=0)


def _ids(values: list, n: int) -> np.ndarray:
    """Redis list of item indices -> int32 [n], -1 padded."""
    out = np.full(n, -1, np.int32)
    if values:
        out[:len(values)] = np.array(values).astype(np.int32)
    return out


def _numbers(values: list) -> np.ndarray:
    """HMGET / ZMSCORE replies (bytes, float or None) -> float64, missing = 0."""
    return np.fromiter((0.0 if v is None else float(v) for v in values), np.float64, len(values))


class RedisStore:
    name = "redis"

    def __init__(self, bundle: Bundle, url: str, event_buffer: int = 100_000):
        st = bundle.state
        self.version, self._v = bundle.version, bundle.version.encode()
        self._catalog = catalog_id(bundle)
        self.primary = bundle.tasks[0]
        self.half_life = float(bundle.manifest["state"]["half_life_days"])
        self.t_ref = float(st.t_ref)
        self.clock = BundleClock(bundle.manifest)
        self.L, self.S = st.user_recent.shape[1], st.user_seen.shape[1]
        self._bundle, self._fb = bundle, st.arrays()    # the fallback: the bundle's end-of-log state
        self.r, self._bg = _client(url, SOCKET_TIMEOUT_S), _client(url, BACKGROUND_TIMEOUT_S)
        self._apply_script = self.r.register_script(_APPLY)
        self._claim_script = self._bg.register_script(_CLAIM)
        self._writer, self._seq = uuid.uuid4().hex, 0
        self._queue: collections.deque[tuple[list, int]] = collections.deque()
        self._queued, self._cap = 0, event_buffer
        self._wlock = threading.Lock()   # one write at a time: this process's batches reach Redis in order
        self._count_lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._local = threading.local()
        self._up = False
        self._wait_seeded()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="store-redis", daemon=True)
        self._thread.start()

    # -- reads ------------------------------------------------------------------------
    def user(self, user_id: str, index: int, default_profile: np.ndarray,
             profiles: np.ndarray) -> UserFeatures:
        profile = profiles[index] if index >= 0 else default_profile
        if self._up:
            k = f"u:{user_id}:"
            p = self.r.pipeline(transaction=False)
            p.get(META).lrange(k + "recent", 0, self.L - 1).lrange(k + "seen", 0, self.S - 1)
            p.hmget(k + "n", "imp", "pos")
            try:
                meta, recent, seen, n = p.execute()
                if meta == self._v:
                    return UserFeatures(index, profile[None], _ids(recent, self.L)[None], _ids(seen, self.S),
                                        float(n[0] or 0), float(n[1] or 0))
                self._lost(f"{META} is {meta!r}, not {self.version}")
            except RedisError as e:
                self._lost(e)
        self._fell_back()
        return state_user(self._fb, index, profile) if index >= 0 else new_user(profile, self.L, self.S)

    def item_stats(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        now = decay(self.t_ref, self.clock.days(), self.half_life)
        if self._up and items.size:
            f = items.tolist()
            p = (self.r if items.size <= BIG_READ else self._bg).pipeline(transaction=False)
            p.get(META).hmget(IMP, f).hmget(POS, f).zmscore(HOT, f)
            try:
                meta, imp, pos, hot = p.execute()
                if meta == self._v:
                    return (_numbers(imp).astype(np.float32), _numbers(pos).astype(np.float32),
                            (_numbers(hot) * now).astype(np.float32))
                self._lost(f"{META} is {meta!r}, not {self.version}")
            except RedisError as e:
                self._lost(e)
        if items.size:
            self._fell_back()
        fb = self._fb
        return fb["item_n_imp"][items], fb["item_n_pos"][items], (fb["item_hot"][items] * now).astype(np.float32)

    def hot_top(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        now = decay(self.t_ref, self.clock.days(), self.half_life)
        if self._up:
            try:
                meta, pairs = self._bg.pipeline(transaction=False).get(META).zrevrange(
                    HOT, 0, n - 1, withscores=True).execute()
                if meta == self._v:
                    top = np.fromiter((int(m) for m, _ in pairs), np.int32, len(pairs))
                    return top, np.fromiter((s for _, s in pairs), np.float64, len(pairs)) * now
                self._lost(f"{META} is {meta!r}, not {self.version}")
            except RedisError as e:
                self._lost(e)
        self._fell_back()
        top, hot = top_hot(self._fb["item_hot"], n)
        return top, hot * now

    def fell_back(self) -> bool:
        fell, self._local.fell = getattr(self._local, "fell", False), False
        return fell

    def stats(self) -> dict[str, int]:
        with self._count_lock:
            return {**self._counts, "up": int(self._up), "buffered": self._queued, "dropped": 0}

    # -- writes -----------------------------------------------------------------------
    def apply(self, events: list[ResolvedEvent]) -> None:
        """Write now if Redis is up and nothing is buffered, else buffer (in order) for the
        background thread; a full buffer refuses the whole batch with Overloaded."""
        args: list = []
        for e in events:
            flags = (e.kind == "impression") | (e.kind == self.primary) << 1
            if flags:   # other kinds change no feature
                args += (flags, e.user_id, int(e.item), repr(float(decay(e.t, self.t_ref, self.half_life))))
        if not args:
            return
        n = len(args) // 4
        with self._wlock:
            if self._up and not self._queue:
                self._seq += 1
                try:
                    if self._apply_script(args=self._head(self._seq) + args, client=self.r) != -1:
                        return
                    self._lost(f"{META} is not {self.version}")
                except RedisError as e:
                    self._lost(e)
                self._queue.append((args, self._seq))  # the reply may be lost, not the write: same seq
            else:
                if self._queued + n > self._cap:
                    self._count("rejected", n)
                    raise Overloaded(f"feature store: Redis unavailable and {self._queued} events buffered "
                                     f"(serving.event_buffer = {self._cap}); retry later")
                self._seq += 1
                self._queue.append((args, self._seq))
            self._queued += n
            self._count("buffered_total", n)

    def _head(self, seq: int) -> list:
        return [self.version, self._writer, seq, self.L, self.S]

    # -- background: seeding, reconnecting, flushing ----------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(RETRY_S):
            if not self._up or self._queue:
                try:
                    self._recover()
                except RedisError as e:
                    self._lost(e)
                except Exception:   # noqa: BLE001 - the thread must outlive any bug, the buffer keeps the events
                    log.exception("redis feature store: recovery failed")

    def _recover(self) -> None:
        """Make sure the DB holds this version (seed it if it came back empty), flush the buffer
        in order, then serve from Redis again."""
        if self._sync() != "ready":
            return
        flushed = 0
        while True:
            with self._wlock:
                if not self._queue:
                    self._up = True
                    break
                chunk = [self._queue[i] for i in range(min(FLUSH_BATCHES, len(self._queue)))]
                p = self.r.pipeline(transaction=False)
                for args, seq in chunk:
                    p.evalsha(self._apply_script.sha, 0, *self._head(seq), *args)
                try:
                    res = p.execute()
                except NoScriptError:
                    self.r.script_load(_APPLY)   # Redis restarted: its script cache is empty
                    continue
                if -1 in res:
                    raise RedisError(f"{META} changed while flushing")
                for args, _ in chunk:
                    self._queue.popleft()
                    self._queued -= len(args) // 4
                    flushed += len(args) // 4
        self._count("retried", flushed)
        log.warning("redis feature store: back; %d buffered events flushed", flushed)

    def _sync(self) -> str:
        """"ready" once the DB holds this version, seeding it first if it is empty or older;
        "busy" while another server seeds; "newer" if it holds a newer version than ours."""
        cur = self._bg.get(META)
        if cur == self._v:
            return "ready"
        if cur is not None and cur > self._v:
            return "newer"
        token = uuid.uuid4().hex
        claimed = self._claim_script(args=[self.version, token, SEED_LOCK_MS, self._catalog])
        if claimed == 0:
            return "busy"
        if claimed == 1:
            self._seed(token)
        return "ready"

    def _wait_seeded(self) -> None:
        end = time.monotonic() + SEED_WAIT_S
        try:
            while (state := self._sync()) == "busy" and time.monotonic() < end:
                time.sleep(RETRY_S)
        except RedisError as e:
            log.warning("redis feature store unreachable at start (%s): serving the bundle's state until it is", e)
            return
        self._up = state == "ready"
        if state != "ready":
            log.warning("redis feature store: DB is %s; serving the bundle's state meanwhile",
                        "being seeded by another server" if state == "busy" else "seeded by a newer bundle")

    def _seed(self, token: str) -> None:
        """Load the bundle's end-of-log state in pipelined chunks, then publish meta:bundle."""
        t0 = time.monotonic()
        st, ids, r = self._bundle.state, np.asarray(self._bundle.user_ids), self._bg
        users = np.flatnonzero((st.user_n_imp > 0) | (st.user_n_pos > 0) | (st.user_recent[:, 0] >= 0))
        for lo in range(0, users.size, SEED_CHUNK):
            p = r.pipeline(transaction=False)
            for u in users[lo:lo + SEED_CHUNK].tolist():
                k = f"u:{ids[u]}:"
                for name, arr in (("recent", st.user_recent[u]), ("seen", st.user_seen[u])):
                    if arr[0] >= 0:
                        p.rpush(k + name, *arr[arr >= 0].tolist())
                p.hset(k + "n", mapping={"imp": int(st.user_n_imp[u]), "pos": int(st.user_n_pos[u])})
            p.pexpire(LOCK, SEED_LOCK_MS).execute()
        for key, values in ((IMP, st.item_n_imp), (POS, st.item_n_pos), (HOT, st.item_hot)):
            nz = np.flatnonzero(values)
            for lo in range(0, nz.size, 10 * SEED_CHUNK):
                part = nz[lo:lo + 10 * SEED_CHUNK]
                if key == HOT:
                    r.zadd(HOT, dict(zip(part.tolist(), np.asarray(values[part], np.float64).tolist())))
                else:
                    r.hset(key, mapping=dict(zip(part.tolist(), np.asarray(values[part]).astype(np.int64).tolist())))
        if r.get(LOCK) != token.encode():
            raise RedisError("seed lock lost while seeding (took longer than its expiry?)")
        r.pipeline(transaction=True).set(META, self.version).set(CATALOG, self._catalog).delete(LOCK).execute()
        log.info("redis feature store seeded with bundle %s: %d users, %d items in %.1f s",
                 self.version, users.size, st.item_n_imp.size, time.monotonic() - t0)

    # -- bookkeeping ------------------------------------------------------------------
    def _lost(self, reason: object) -> None:
        if self._up:
            log.warning("redis feature store unavailable (%s): serving the bundle's state, buffering events", reason)
        self._up = False

    def _fell_back(self) -> None:
        self._local.fell = True
        self._count("fallbacks")

    def _count(self, key: str, n: int = 1) -> None:
        with self._count_lock:
            self._counts[key] += n

    def close(self, flush_s: float = 2.0) -> None:
        """Stop the background thread after a last chance to flush buffered events."""
        self._stop.set()
        self._thread.join()
        end = time.monotonic() + flush_s
        while self._queue and time.monotonic() < end:
            try:
                self._recover()
            except RedisError:
                time.sleep(RETRY_S)
        if self._queue:
            log.error("redis feature store closed with %d events still buffered (Redis unreachable): "
                      "they are lost", self._queued)
        self.r.close()
        self._bg.close()
