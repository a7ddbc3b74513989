"""Redis feature store: one live state shared by every server process and machine.

Two deployments, one key layout: a standalone Redis (`redis://HOST:PORT/DB`, `rediss://`,
`unix://`) or a Redis Cluster (`rediscluster://[USER:PASSWORD@]HOST:PORT,HOST:PORT,...`, any
reachable subset of the nodes; the rest is discovered with CLUSTER SLOTS).

Key space (one Redis DB, or one cluster, belongs to one recserve deployment; item fields and
members are the bundle's item indices, user keys the external user id, known or not):
    meta:{g}:bundle        bundle version whose state the DB holds
    meta:{g}:catalog       item and user id tables (sha256) and ring sizes that state is keyed by
    meta:{g}:seed          lock (SET NX semantics, expiring) of the server seeding the DB
    meta:{g}:epoch         token of the seeding that wrote the item counters (a new one: mirrors reload)
    item:{g}:imp, :pos     hash: item index -> count
    item:{g}:hot           sorted set: item index -> sum of decay(t_event, t_ref) over positives
    item:{g}:log           stream: the item deltas of every applied batch (MAXLEN ~ LOG_LEN)
    u:{T}:<user>:recent    list: last primary-task positives, most recent first (LPUSH + LTRIM)
    u:{T}:<user>:seen      list: last impressions
    u:{T}:<user>:n         hash: imp, pos
    s:{T}                  cluster only: bundle version of the state in slot T (slot g: meta:{g}:bundle)
    ev:{T}:<writer>        last event sub-batch applied to slot T by one server process

`{...}` is a hash tag: Redis Cluster places a key by the CRC16 of its tag only. `{g}` puts the
item counters, their log and the meta keys in one slot, so one script updates them together;
that slot's shard takes the item part of every event batch (docs/feature_store.md, "The hot
shard"), but no request-path read: item stats come from the mirror. A user's keys carry the
tag T of the user's own slot (CRC16(user id) mod 16384, where Redis would put the id itself),
spelled with a fixed table (`slot_tags()`: for each slot, the first string over [0-9a-zA-Z],
shortest first, that hashes to it), so the three keys of any id, braces included, sit together
on one shard and users spread over all of them. A standalone Redis ignores the tags: same key
names there.

Item mirror. Each store (server process) keeps the item counters in local numpy arrays (imp,
pos float32, hot float64: 16 bytes per item), so item_stats and hot_top cost no round trip and
no Redis CPU. A background load reads them in chunks of MIRROR_CHUNK items, each chunk in one
MULTI with the log's last id, then replays the log entries after the oldest of those ids, each
onto the chunks read before it: exact without blocking Redis for the whole catalog. Then the
background thread (every RETRY_S) tails item:{g}:log with XREAD and adds the other writers'
deltas (np.add.at); this process's own batches go into its mirror when Redis acknowledges them
(read-your-writes; its log entries, marked with its sequence key, are skipped when tailing).
A full reload happens at start, when meta:{g}:epoch changes (the DB was re-seeded), and when
entries not read yet were trimmed away (XINFO entries-added - length > entries read; Redis 7).
META not naming this version drops the mirror (item reads from the bundle, flagged) and marks
slot g's node down, so the background thread re-seeds or waits. Redis unreachable: the mirror
keeps serving its last state, newer than the bundle's (stats: mirror_lag_ms), unflagged until it
has not synced for MIRROR_STALE_S, flagged after that.

Units. Every read and write addresses one slot: a user read goes to the user's slot (stamp,
recent, seen, counters: one round trip, the only one of a Recommend). An event batch is split
per slot: one Lua call per user slot it touches (those users' keys) and one for slot g (item
counters, plus one item:{g}:log entry), each declaring every key it touches in KEYS; calls are
pipelined per node (one round trip per node holding part of the batch). On a standalone Redis the whole DB is one
unit (slot g): one call per batch, as before.

Guarantees of the event apply, per unit (KEYS[1] is the unit's stamp: meta:{g}:bundle for slot
g and on a standalone Redis, s:{T} for the other cluster slots):
  - never into another bundle's state: the call does nothing (-1) unless the stamp names this
    bundle version. Seeding writes a slot's users and its stamp in one script; a node that
    restarts empty loses its stamps with its data, so nothing lands there until it is repaired;
  - exactly once and in order: each process numbers its sub-batches per unit (1, 2, 3, ...) and
    the call applies number n only if ev:{T}:<writer> holds n - 1 (0: already applied, a retry
    whose first reply was lost; -2: an earlier one is missing, kept for later). A missing
    ev key stands for the last number this process saw acknowledged (new writer, the TTL
    expired, or the node restarted empty). So a pipeline that fails half-way is re-sent as a
    whole and each sub-batch lands once, in order;
  - per slot, not per batch: the parts of one batch on different shards are not atomic
    together; one may be applied while another waits in the buffer for its shard. The item
    part (slot g) is sent first and nothing else without it: if slot g's shard comes back
    empty every shard is re-seeded, which would wipe user parts written meanwhile.

Seeding: the first server to find meta:{g}:bundle missing (first start, Redis or the g shard
restarted without persistence) or holding an older bundle over another catalog empties the
DB (FLUSHDB in the claim script on the g shard, then FLUSHDB on every other primary) and loads
its bundle's end-of-log state under the lock, one script per slot (its users, then its stamp),
pipelined per node; the others wait until meta:{g}:bundle names their version. A newer bundle
over the same catalog adopts the DB as it is (and re-stamps the slots), so events accepted
since the last bundle survive a model update. A cluster shard that comes back empty while
meta:{g}:bundle still names this version is repaired slot by slot (users re-seeded from the
bundle, only where the stamp is missing, atomically with setting it); the other shards keep
their live state.

Faults: request-path commands go to one node's plain client with a 50 ms socket timeout and no
retries, and follow no redirection: redis-py's ClusterPipeline (8.1) would re-send each failed
command of a timed-out pipeline on its own and re-read the slot map inline, so one request
could wait several timeouts; here a request waits at most one timeout per node it contacts
(a Recommend contacts one), and a node that failed is skipped until the background thread has
reached it again. The slot map is only re-read in the background. A read that fails, or finds the
unit's stamp not naming this version, is answered from the bundle's state and flagged (the
engine marks the response degraded); the store then stays on the bundle's state for the
users of that node (standalone: everyone) until the background thread reaches it again.
Events that cannot be written are buffered in order per unit, up to a bound (then
Overloaded), and flushed by that thread once slot g's node and theirs answer and their slots
hold this version again (re-seeding them first if they came back empty).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import logging
import string
import threading
import time
import uuid
from binascii import crc_hqx
from dataclasses import dataclass
from urllib.parse import unquote

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.retry import Retry

from engine.core.bundle import Bundle
from engine.core.context import UserFeatures
from engine.core.errors import Overloaded
from engine.core.features import BundleClock, ResolvedEvent
from engine.store.common import catalog_id, new_user, state_user, top_hot
from engine.core.state import decay

log = logging.getLogger("recserve.store")

SOCKET_TIMEOUT_S = 0.05     # request path: a slow Redis costs a request this much once, then fallback
BACKGROUND_TIMEOUT_S = 5.0  # seeding chunks, hot list refreshes and other big reads off the request path
LOG_LEN = 20_000            # item:{g}:log entries kept (MAXLEN ~): a mirror further behind reloads
MIRROR_CHUNK = 4096         # items per atomic read (MULTI) of a full mirror load
TAIL_COUNT = 1000           # log entries per XREAD / XRANGE
MIRROR_STALE_S = 5.0        # a mirror not synced for longer serves on, but flags its reads
SEED_CHUNK = 1000           # users per seeding pipeline
SEED_LOCK_MS = 30_000       # the seeder refreshes it per chunk; a crashed seeder's lock expires
SEED_WAIT_S = 120.0         # start-up waits this long for another server's seeding
RETRY_S = 0.2               # background reconnect / flush period
FLUSH_CALLS = 64            # buffered sub-batches per flush round trip ...
FLUSH_ARGS = 12_000         # ... and script arguments (~2,000 events): it runs on the 50 ms socket
SEQ_TTL_S = 7 * 86400
SLOTS = 16384               # Redis Cluster hash slots

META, CATALOG, LOCK = "meta:{g}:bundle", "meta:{g}:catalog", "meta:{g}:seed"
IMP, POS, HOT, LOG = "item:{g}:imp", "item:{g}:pos", "item:{g}:hot", "item:{g}:log"
EPOCH = "meta:{g}:epoch"
_ERRORS = (RedisError, RedisClusterException)


def _crc_slot(text: str) -> int:
    return crc_hqx(text.encode(), 0) % SLOTS


META_SLOT = _crc_slot("g")


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """For each cluster slot, the first string over [0-9a-zA-Z] (shorter first) whose CRC16 lands
    in it: the hash tag that pins a key to that slot. Every server derives the same table."""
    tags: list[str | None] = [None] * SLOTS
    left = SLOTS
    for n in (1, 2, 3):     # all 16,384 slots are hit within 3 characters
        for chars in itertools.product(string.digits + string.ascii_letters, repeat=n):
            tag = "".join(chars)
            s = _crc_slot(tag)
            if tags[s] is None:
                tags[s], left = tag, left - 1
        if not left:
            return tuple(tags)
    raise AssertionError("slot tag table incomplete")


def user_slot(user_id: str) -> int:
    return _crc_slot(user_id)


def user_key(user_id: str, slot: int | None = None) -> str:
    """Prefix of the user's keys (`u:{T}:<user id>:`); + recent, seen or n."""
    return f"u:{{{slot_tags()[user_slot(user_id) if slot is None else slot]}}}:{user_id}:"


def stamp_key(slot: int) -> str:
    """Key whose value is the bundle version of the state in `slot` (cluster)."""
    return META if slot == META_SLOT else f"s:{{{slot_tags()[slot]}}}"


class _Script:
    def __init__(self, text: str):
        self.text, self.sha = text, hashlib.sha1(text.encode()).hexdigest()


# KEYS: stamp, sequence key, [item:imp, item:pos, item:hot, item:log if there are item ops], then
# per user: seen, recent, n. ARGV: version, seq, last seq acknowledged to this writer, recent_len,
# seen_len, number of user ops, then per user op: flags (1 impression, 2 primary positive),
# index in KEYS of the user's seen key, item; then per item op: flags, item, hot weight.
_APPLY = _Script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local seq, last = tonumber(ARGV[2]), tonumber(redis.call('GET', KEYS[2]) or ARGV[3])
if seq <= last then return 0 end
if seq > last + 1 then return -2 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', SEQ_TTL)
local rlen, slen = tonumber(ARGV[4]) - 1, tonumber(ARGV[5]) - 1
local i = 7
for _ = 1, tonumber(ARGV[6]) do
  local flags, k, item = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), ARGV[i + 2]
  if flags % 2 == 1 then
    redis.call('LPUSH', KEYS[k], item)
    redis.call('LTRIM', KEYS[k], 0, slen)
    redis.call('HINCRBY', KEYS[k + 2], 'imp', 1)
  end
  if flags >= 2 then
    redis.call('LPUSH', KEYS[k + 1], item)
    redis.call('LTRIM', KEYS[k + 1], 0, rlen)
    redis.call('HINCRBY', KEYS[k + 2], 'pos', 1)
  end
  i = i + 3
end
local imps, poss, hots = {}, {}, {}
for j = i, #ARGV, 3 do
  local flags, item = tonumber(ARGV[j]), ARGV[j + 1]
  if flags % 2 == 1 then
    redis.call('HINCRBY', KEYS[3], item, 1)
    imps[#imps + 1] = item
  end
  if flags >= 2 then
    redis.call('HINCRBY', KEYS[4], item, 1)
    redis.call('ZINCRBY', KEYS[5], ARGV[j + 2], item)
    poss[#poss + 1] = item
    hots[#hots + 1] = ARGV[j + 2]
  end
end
if i <= #ARGV then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', LOG_LEN, '*', 'w', KEYS[2], 'i', table.concat(imps, ' '),
             'p', table.concat(poss, ' '), 'h', table.concat(hots, ' '))
end
return 1
""".replace("SEQ_TTL", str(SEQ_TTL_S)).replace("LOG_LEN", str(LOG_LEN)))

# KEYS: meta:{g}:bundle, meta:{g}:catalog, meta:{g}:seed. ARGV: version, token, lock ms, catalog id.
# Unless the DB already holds this or a newer version or another server is seeding it: a DB
# holding the same catalog is adopted as it is (live events since the last bundle are kept:
# nothing accepted is lost), any other is emptied (on a cluster: this shard; the seeder empties
# the others) and the seed lock taken. Atomic: nobody seeds twice.
_CLAIM = _Script("""
local cur = redis.call('GET', KEYS[1])
if (cur and cur >= ARGV[1]) or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if cur and redis.call('GET', KEYS[2]) == ARGV[4] then
  redis.call('SET', KEYS[1], ARGV[1])
  return 2
end
redis.call('FLUSHDB')
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
return 1
""")

# One slot's users from the bundle. KEYS: the slot's stamp, then per user: recent, seen, n.
# ARGV: version, mode (0: write; 1: write, then stamp; 2: only if the stamp is missing, then
# stamp: a repair racing another server's repair or seeding never overwrites live state),
# then per user: n recent, items, n seen, items, imp, pos.
_SEED = _Script("""
if ARGV[2] == '2' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local i = 3
for k = 2, #KEYS, 3 do
  redis.call('DEL', KEYS[k], KEYS[k + 1], KEYS[k + 2])
  for j = 0, 1 do
    local n = tonumber(ARGV[i])
    if n > 0 then redis.call('RPUSH', KEYS[k + j], unpack(ARGV, i + 1, i + n)) end
    i = i + n + 1
  end
  redis.call('HSET', KEYS[k + 2], 'imp', ARGV[i], 'pos', ARGV[i + 1])
  i = i + 2
end
if ARGV[2] ~= '0' then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
""")

# A slot stamped by an older bundle over the same catalog (an adopted DB): now this version's.
_RESTAMP = _Script("""
local cur = redis.call('GET', KEYS[1])
if cur and cur < ARGV[1] then redis.call('SET', KEYS[1], ARGV[1]) return 1 end
return 0
""")


def _eval(client: redis.Redis, script: _Script, calls: list[tuple[list, list]]) -> list:
    """EVALSHA `script` once per (keys, args) in one pipeline on one node (one round trip).
    Calls that found the script missing (a restarted node's cache is empty) are re-run after
    loading it. Per call: the reply, or the error it got; connection errors raise."""
    def run(batch: list[tuple[list, list]]) -> list:
        p = client.pipeline(transaction=False)
        for keys, args in batch:
            p.evalsha(script.sha, len(keys), *keys, *args)
        return p.execute(raise_on_error=False)

    res = run(calls)
    redo = [i for i, r in enumerate(res) if isinstance(r, NoScriptError)]
    if redo:
        client.script_load(script.text)
        for i, r in zip(redo, run([calls[i] for i in redo])):
            res[i] = r
    return res


def _eval1(client: redis.Redis, script: _Script, keys: list, args: list):
    r = _eval(client, script, [(keys, args)])[0]
    if isinstance(r, Exception):
        raise r
    return r


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


class _Standalone:
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


class _Cluster:
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
        except _ERRORS as e:
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


@dataclass(slots=True)
class _Batch:
    n: int          # events
    left: int = 0   # its sub-batches still buffered


@dataclass(slots=True)
class _Entry:
    """The part of one event batch that lands in one unit (slot)."""
    unit: int
    seq: int
    keys: list      # after the stamp and the sequence key
    args: list      # after the head: number of user ops, user ops, item ops
    batch: _Batch


class _SlotOps:
    """Builds one unit's share of a batch: its users' keys (3 each) and ops."""
    __slots__ = ("keys", "index", "user", "item")

    def __init__(self, with_items: bool):
        self.keys: list[str] = [IMP, POS, HOT, LOG] if with_items else []
        self.index: dict[str, int] = {}
        self.user: list = []
        self.item: list = []

    def add_user(self, flags: int, prefix: str, item: int) -> None:
        k = self.index.get(prefix)
        if k is None:   # KEYS is 1-based and starts with the stamp and the sequence key
            k = self.index[prefix] = len(self.keys) + 3
            self.keys += (prefix + "seen", prefix + "recent", prefix + "n")
        self.user += (flags, k, item)


def _ids(values: list, n: int) -> np.ndarray:
    """Redis list of item indices -> int32 [n], -1 padded."""
    out = np.full(n, -1, np.int32)
    if values:
        out[:len(values)] = np.array(values).astype(np.int32)
    return out


def _numbers(values: list) -> np.ndarray:
    """HMGET / ZMSCORE replies (bytes, float or None) -> float64, missing = 0."""
    return np.fromiter((0.0 if v is None else float(v) for v in values), np.float64, len(values))


def _sid(raw) -> tuple[int, int]:
    """Stream entry id (b"<ms>-<seq>") -> (ms, seq); none -> (0, 0), before every entry."""
    if not raw:
        return (0, 0)
    ms, _, seq = (raw.decode() if isinstance(raw, bytes) else raw).partition("-")
    return int(ms), int(seq or 0)


def _sids(ids: tuple[int, int]) -> str:
    return f"{ids[0]}-{ids[1]}"


def _log_info(info) -> tuple[tuple[int, int], int, int]:
    """XINFO STREAM of the item log (or its error: no log yet) -> last id, entries ever added,
    entries trimmed away (MAXLEN; entries are never deleted otherwise). Redis >= 7.0."""
    if isinstance(info, Exception):
        if "no such key" in str(info).lower():
            return (0, 0), 0, 0
        raise info
    added = int(info["entries-added"])
    return _sid(info["last-generated-id"]), added, added - int(info["length"])


def _split(fields: list[bytes], dtype) -> np.ndarray:
    """Space-joined numbers of several log entries -> one array."""
    return np.array(b" ".join(fields).split()).astype(dtype)


class _Mirror:
    """This process's copy of the item counters: imp, pos (float32) and hot (float64, the
    undecayed sum as in item:{g}:hot), indexed by item; as of log entry `last` of `epoch`."""
    __slots__ = ("imp", "pos", "hot", "epoch", "last", "added")

    def __init__(self, n: int, epoch: bytes | None):
        self.imp, self.pos = np.zeros(n, np.float32), np.zeros(n, np.float32)
        self.hot = np.zeros(n, np.float64)
        self.epoch, self.last, self.added = epoch, (0, 0), 0   # added: log entries up to `last`

    def add(self, imp: np.ndarray, pos: np.ndarray, hot: np.ndarray) -> None:
        np.add.at(self.imp, imp, 1)
        np.add.at(self.pos, pos, 1)
        np.add.at(self.hot, pos, hot)


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
        slot_tags()
        self._net = _Cluster(url) if url.startswith("rediscluster://") else _Standalone(url)
        self._writer = uuid.uuid4().hex[:16]
        self._next: dict[int, int] = {}     # unit -> last sub-batch number given out
        self._acked: dict[int, int] = {}    # unit -> last sub-batch number known applied
        self._pending: dict[int, collections.deque[_Entry]] = {}   # unit -> buffered, in order
        self._queued, self._cap = 0, event_buffer                  # events with a part buffered
        self._wlock = threading.Lock()   # one write at a time: this process's batches reach Redis in order
        self._count_lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._local = threading.local()
        self._ready = False              # meta:{g}:bundle names this version (as last seen)
        self._down: set[str] = set()     # nodes whose users are served from the bundle meanwhile
        self._seeded_users: dict[int, list[int]] | None = None
        self._n_items = int(st.item_n_imp.size)
        self._mirror: _Mirror | None = None   # None: item reads come from the bundle (flagged)
        self._m_lock = threading.Lock()      # in-place updates: own acknowledged writes vs the tail
        self._m_own = 0                      # last own item sub-batch (slot g) reflected in the mirror
        self._m_ok = 0.0                     # monotonic time the mirror was last known current
        self._evg = f"ev:{{{slot_tags()[META_SLOT]}}}:{self._writer}".encode()   # 'w' of own log entries
        self._wait_seeded()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="store-redis", daemon=True)
        self._thread.start()

    def _unit(self, slot: int) -> int:
        return slot if self._net.cluster else META_SLOT

    def _route(self, unit: int) -> str | None:
        """The node to read `unit` from, or None: answer from the bundle's state."""
        if not self._ready:
            return None
        try:
            node = self._net.node(unit)
        except _ERRORS as e:
            self._lost(e)
            return None
        return None if node in self._down else node

    # -- reads ------------------------------------------------------------------------
    def user(self, user_id: str, index: int, default_profile: np.ndarray,
             profiles: np.ndarray) -> UserFeatures:
        profile = profiles[index] if index >= 0 else default_profile
        slot = user_slot(user_id)
        unit = self._unit(slot)
        node = self._route(unit)
        if node is not None:
            k = user_key(user_id, slot)
            try:
                p = self._net.client(node).pipeline(transaction=False)
                p.get(stamp_key(unit)).lrange(k + "recent", 0, self.L - 1).lrange(k + "seen", 0, self.S - 1)
                p.hmget(k + "n", "imp", "pos")
                stamp, recent, seen, n = p.execute()
                if stamp == self._v:
                    return UserFeatures(index, profile[None], _ids(recent, self.L)[None], _ids(seen, self.S),
                                        float(n[0] or 0), float(n[1] or 0))
                self._lost(f"{stamp_key(unit)} is {stamp!r}, not {self.version}", node)
            except _ERRORS as e:
                self._lost(e, node)
        self._fell_back()
        return state_user(self._fb, index, profile) if index >= 0 else new_user(profile, self.L, self.S)

    def item_stats(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """From the local mirror: no round trip. Until its first load (or after the DB was
        re-seeded or taken by another bundle version, until it is reloaded): the bundle's
        state, flagged; a mirror that could not sync for MIRROR_STALE_S serves on, flagged."""
        now = decay(self.t_ref, self.clock.days(), self.half_life)
        imp, pos, hot = self._counters(flag=items.size > 0)
        return imp[items], pos[items], (hot[items] * now).astype(np.float32)

    def hot_top(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        now = decay(self.t_ref, self.clock.days(), self.half_life)
        top, hot = top_hot(self._counters(flag=True)[2], n)
        return top, hot * now

    def _counters(self, flag: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(impressions, positives, hot) of every item: the mirror, else the bundle's state;
        answers from the bundle or from a stale mirror are flagged when `flag`."""
        m = self._mirror
        if flag and (m is None or self._stale()):
            self._fell_back()
        if m is not None:
            return m.imp, m.pos, m.hot
        return self._fb["item_n_imp"], self._fb["item_n_pos"], self._fb["item_hot"]

    def _stale(self) -> bool:
        return time.monotonic() - self._m_ok > MIRROR_STALE_S

    def fell_back(self) -> bool:
        fell, self._local.fell = getattr(self._local, "fell", False), False
        return fell

    def stats(self) -> dict[str, int]:
        with self._count_lock:
            out = {**self._counts, "up": int(self._ready and not self._down), "buffered": self._queued, "dropped": 0}
        out["mirror_lag_ms"] = int((time.monotonic() - self._m_ok) * 1e3) if self._mirror is not None else -1
        if self._net.cluster:
            out["nodes_down"] = len(self._down)
        return out

    # -- writes -----------------------------------------------------------------------
    def apply(self, events: list[ResolvedEvent]) -> None:
        """Write now the parts of the batch whose node is up and has nothing buffered for their
        slot, buffer the others (in order) for the background thread; a full buffer refuses
        the whole batch with Overloaded before anything is written."""
        parts: dict[int, _SlotOps] = {}
        n = 0
        for e in events:
            flags = (e.kind == "impression") | (e.kind == self.primary) << 1
            if not flags:   # other kinds change no feature
                continue
            n += 1
            item, slot = int(e.item), user_slot(e.user_id)
            unit = self._unit(slot)
            ops = parts.get(unit) or parts.setdefault(unit, _SlotOps(unit == META_SLOT))
            ops.add_user(flags, user_key(e.user_id, slot), item)
            ops = parts.get(META_SLOT) or parts.setdefault(META_SLOT, _SlotOps(True))
            ops.item += (flags, item, repr(float(decay(e.t, self.t_ref, self.half_life))))
        if not n:
            return
        with self._wlock:
            # the item part first: while slot g cannot be written the whole batch waits, so that
            # if its shard comes back empty (every shard re-seeded) nothing acknowledged is lost
            now = [u for u in parts if self._writable(u)] if self._writable(META_SLOT) else []
            if len(now) < len(parts) and self._queued + n > self._cap:
                self._count("rejected", n)
                raise Overloaded(f"feature store: Redis unavailable and {self._queued} events buffered "
                                 f"(serving.event_buffer = {self._cap}); retry later")
            batch = _Batch(n)
            entries = {}
            for u, ops in parts.items():
                seq = self._next[u] = self._next.get(u, 0) + 1
                entries[u] = _Entry(u, seq, ops.keys, [len(ops.user) // 3, *ops.user, *ops.item], batch)
            failed = self._write([entries[u] for u in now])   # the reply may be lost, not the write: same seq
            direct = set(now)
            later = [e for u, e in entries.items() if u not in direct] + failed
            for e in later:
                self._pending.setdefault(e.unit, collections.deque()).append(e)
            if later:
                batch.left = len(later)
                self._queued += n
                self._count("buffered_total", n)

    def _writable(self, unit: int) -> bool:
        if not self._ready or unit in self._pending:
            return False
        try:
            return self._net.node(unit) not in self._down
        except _ERRORS:
            return False

    def _call(self, e: _Entry) -> tuple[list, list]:
        return ([stamp_key(e.unit), f"ev:{{{slot_tags()[e.unit]}}}:{self._writer}", *e.keys],
                [self.version, e.seq, self._acked.get(e.unit, 0), self.L, self.S, *e.args])

    def _write(self, entries: list[_Entry]) -> list[_Entry]:
        """Apply sub-batches now, one pipeline per node, the node of slot g first (nothing else
        is sent if its part fails); returns those not known to be applied."""
        by_node: dict[str, list[_Entry]] = {}
        failed: list[_Entry] = []
        try:
            by_node[self._net.node(META_SLOT)] = []
            for e in entries:
                by_node.setdefault(self._net.node(e.unit), []).append(e)
        except _ERRORS as err:
            self._lost(err)
            return entries
        items_ok = True
        for node, es in by_node.items():
            if not es:
                continue
            if not items_ok:
                failed += es
                continue
            try:
                res = _eval(self._net.client(node), _APPLY, [self._call(e) for e in es])
            except _ERRORS as err:
                self._lost(err, node)
                res = [err] * len(es)
            for e, r in zip(es, res):
                if r in (0, 1):
                    self._acked[e.unit] = e.seq
                    self._mirror_own(e)
                else:
                    self._lost(self._why(r, e.unit), node)
                    failed.append(e)
                    items_ok = items_ok and e.unit != META_SLOT
        return failed

    def _why(self, r: object, unit: int) -> str:
        if r == -1:
            return f"{stamp_key(unit)} is not {self.version}"
        if r == -2:
            return f"an earlier event batch for slot {unit} is still missing"
        return str(r)

    # -- background: seeding, repairing, reconnecting, flushing -----------------------
    def _loop(self) -> None:
        while not self._stop.wait(RETRY_S):
            if not self._ready or self._down or self._queued:
                try:
                    self._recover()
                except _ERRORS as e:
                    self._lost(e)
                except Exception:   # noqa: BLE001 - the thread must outlive any bug, the buffer keeps the events
                    log.exception("redis feature store: recovery failed")
            self._mirror_sync()

    def _recover(self) -> None:
        """Make sure the DB holds this version (seed it if it came back empty), then, node by
        node: repair its slots if they came back empty, flush its buffered sub-batches in
        order, serve its users from Redis again."""
        self._net.refresh()
        meta = self._net.node(META_SLOT)
        try:
            state = self._sync()
        except _ERRORS as e:
            # nothing is flushed while the g shard is unreachable: if it comes back empty, every
            # shard is emptied and re-seeded, and what was buffered meanwhile is replayed on top
            self._lost(e, meta)
            return
        if state != "ready":
            self._ready = False
            return
        self._mirror_sync()   # (re)loaded before the flush: a re-seeded DB is mirrored before "up"
        primaries = self._net.primaries()
        if not self._ready:
            self._down |= set(primaries)
            self._ready = True
        with self._wlock:
            pending = {self._net.node(u) for u in self._pending}
        self._down &= set(primaries)
        for node in primaries:
            if node not in self._down and node not in pending:
                continue
            try:
                self._net.client(node).ping()
                self._repair(node)
                self._flush(node)
            except _ERRORS as e:
                self._lost(e, node)

    def _flush(self, node: str) -> None:
        """Send the node's buffered sub-batches in order, a bounded pipeline per round trip,
        until none is left; then its users are read from Redis again."""
        flushed = 0
        while True:
            with self._wlock:
                units = [u for u in self._pending if self._net.node(u) == node]
                if not units:
                    back = node in self._down
                    self._down.discard(node)
                    break
                sent, size = [], 0
                for e in itertools.chain.from_iterable(self._pending[u] for u in units):
                    if sent and (len(sent) == FLUSH_CALLS or size + len(e.args) > FLUSH_ARGS):
                        break
                    sent.append(e)
                    size += len(e.args)
                res = _eval(self._net.client(node), _APPLY, [self._call(e) for e in sent])
                blocked: dict[int, object] = {}
                progress = False
                for e, r in zip(sent, res):
                    if e.unit in blocked:
                        continue
                    if r in (0, 1):
                        progress = True
                        if r == 0:
                            self._count("duplicates")   # applied before: its first reply was lost
                        q = self._pending[e.unit]
                        q.popleft()
                        if not q:
                            del self._pending[e.unit]
                        self._acked[e.unit] = e.seq
                        self._mirror_own(e)
                        e.batch.left -= 1
                        if not e.batch.left:
                            self._queued -= e.batch.n
                            flushed += e.batch.n
                    else:
                        blocked[e.unit] = r
                if -1 in blocked.values() or not progress:   # a slot lost its state, or stuck: retry later
                    unit, r = next(((u, r) for u, r in blocked.items() if r == -1), next(iter(blocked.items())))
                    raise RedisError(f"flushing to {node}: {self._why(r, unit)}")
        if flushed or back:
            self._count("retried", flushed)
            log.warning("redis feature store: %s back; %d buffered events flushed", node, flushed)

    def _sync(self) -> str:
        """"ready" once meta:{g}:bundle names this version, seeding the DB first if it is empty
        or older; "busy" while another server seeds; "newer" if it holds a newer version."""
        meta = self._net.client(self._net.node(META_SLOT), slow=True)
        cur = meta.get(META)
        if cur == self._v:
            return "ready"
        if cur is not None and cur > self._v:
            return "newer"
        token = uuid.uuid4().hex
        claimed = _eval1(meta, _CLAIM, [META, CATALOG, LOCK], [self.version, token, SEED_LOCK_MS, self._catalog])
        if claimed == 0:
            return "busy"
        if claimed == 1:
            self._seed(token)
        self._down |= set(self._net.primaries())   # seeded or adopted: check (re-stamp) every node's slots
        return "ready"

    def _wait_seeded(self) -> None:
        end = time.monotonic() + SEED_WAIT_S
        try:
            self._net.refresh()
            while (state := self._sync()) == "busy" and time.monotonic() < end:
                time.sleep(RETRY_S)
        except _ERRORS as e:
            log.warning("redis feature store unreachable at start (%s): serving the bundle's state until it is", e)
            return
        if state != "ready":
            log.warning("redis feature store: DB is %s; serving the bundle's state meanwhile",
                        "being seeded by another server" if state == "busy" else "seeded by a newer bundle")
            return
        self._down = set(self._net.primaries())
        self._ready = True
        self._mirror_sync()
        for node in self._net.primaries():
            try:
                self._repair(node)
                self._down.discard(node)
            except _ERRORS as e:
                self._lost(e, node)

    def _users_by_slot(self) -> dict[int, list[int]]:
        """Bundle users with any state (the ones seeding writes), grouped by their slot."""
        if self._seeded_users is None:
            st, ids = self._bundle.state, np.asarray(self._bundle.user_ids).tolist()
            users = np.flatnonzero((st.user_n_imp > 0) | (st.user_n_pos > 0) | (st.user_recent[:, 0] >= 0))
            by_slot: dict[int, list[int]] = {}
            for u in users.tolist():
                by_slot.setdefault(user_slot(str(ids[u])), []).append(u)
            self._seeded_users = by_slot
        return self._seeded_users

    def _seed_slots(self, node: str, slots, repair: bool, lock_token: str | None = None) -> int:
        """Write the bundle's users of `slots` (all on `node`), one script per slot, SEED_CHUNK
        users per pipeline. Seeding (repair=False) writes unconditionally and, on a cluster,
        stamps every slot but g's (meta:{g}:bundle is published last); a repair writes and
        stamps only slots whose stamp is missing. Returns the users written."""
        st, ids = self._bundle.state, np.asarray(self._bundle.user_ids).tolist()
        by_slot, client = self._users_by_slot(), self._net.client(node, slow=True)
        calls: list[tuple[list, list]] = []
        size = written = 0

        def send() -> None:
            for r in _eval(client, _SEED, calls):
                if isinstance(r, Exception):
                    raise r
            if lock_token is not None:
                self._net.client(self._net.node(META_SLOT), slow=True).pexpire(LOCK, SEED_LOCK_MS)
            calls.clear()

        for s in slots:
            mode = 2 if repair else 1 if self._net.cluster and s != META_SLOT else 0
            users = by_slot.get(s, ())
            if not users and not mode:
                continue
            keys, args = [stamp_key(s)], [self.version, mode]
            for u in users:
                k = user_key(str(ids[u]), s)
                keys += (k + "recent", k + "seen", k + "n")
                for arr in (st.user_recent[u], st.user_seen[u]):
                    v = arr[arr >= 0].tolist()
                    args += (len(v), *v)
                args += (int(st.user_n_imp[u]), int(st.user_n_pos[u]))
            calls.append((keys, args))
            size += len(users) + 1
            written += len(users)
            if size >= SEED_CHUNK:
                send()
                size = 0
        if calls:
            send()
        return written

    def _seed(self, token: str) -> None:
        """Empty the other shards (the claim emptied g's), load the bundle's end-of-log state
        node by node, then publish meta:{g}:bundle."""
        t0 = time.monotonic()
        st = self._bundle.state
        meta_node = self._net.node(META_SLOT)
        r = self._net.client(meta_node, slow=True)
        if self._net.cluster:
            for node in self._net.primaries():
                if node != meta_node:
                    self._net.client(node, slow=True).flushdb()
        users = sum(self._seed_slots(node, self._net.slots(node), False, token) for node in self._net.primaries())
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
        r.pipeline(transaction=True).set(META, self.version).set(CATALOG, self._catalog).set(EPOCH, token).delete(
            LOCK).execute()   # a new epoch: every mirror reloads
        log.info("redis feature store seeded with bundle %s: %d users, %d items in %.1f s",
                 self.version, users, st.item_n_imp.size, time.monotonic() - t0)

    def _repair(self, node: str) -> None:
        """Cluster: every slot of `node` must hold this version. A missing stamp (the node came
        back empty) gets the slot's users re-seeded from the bundle; an older one (a DB adopted
        by this version: same catalog) is re-stamped; a newer one keeps the node down."""
        if not self._net.cluster:
            return
        slots = [s for s in self._net.slots(node) if s != META_SLOT]
        client = self._net.client(node, slow=True)
        stamps: list = []
        for lo in range(0, len(slots), 4096):
            p = client.pipeline(transaction=False)
            for s in slots[lo:lo + 4096]:
                p.get(stamp_key(s))
            stamps += p.execute()
        if any(v is not None and v > self._v for v in stamps):
            raise RedisError(f"{node} holds slots of a newer bundle than {self.version}")
        older = [s for s, v in zip(slots, stamps) if v is not None and v != self._v]
        if older:
            for r in _eval(client, _RESTAMP, [([stamp_key(s)], [self.version]) for s in older]):
                if isinstance(r, Exception):
                    raise r
        missing = [s for s, v in zip(slots, stamps) if v is None]
        if missing:
            users = self._seed_slots(node, missing, True)
            log.warning("redis feature store: %s had lost %d slots; re-seeded them from bundle %s (%d users)",
                        node, len(missing), self.version, users)

    # -- the item mirror ----------------------------------------------------------------
    def _mirror_sync(self) -> None:
        """Background: load the mirror if there is none, else tail the log. Errors leave the
        mirror as it is (serving its last state; stats: mirror_lag_ms)."""
        try:
            if self._mirror is None:
                self._mirror_load()
            else:
                self._mirror_tail()
        except _ERRORS as e:
            self._count("mirror_errors")
            log.debug("redis feature store: item mirror not synced (%s)", e)
        except Exception:   # noqa: BLE001 - the thread must outlive any bug
            log.exception("redis feature store: item mirror sync failed")

    def _mirror_drop(self, why: str, node: str) -> None:
        """The DB does not hold this version (any more): item reads from the bundle, flagged,
        and the node is marked down so that the background thread re-seeds or waits for it."""
        if self._mirror is not None:
            log.warning("redis feature store: item mirror dropped (%s)", why)
        self._mirror = None
        self._lost(why, node)

    def _mirror_tail(self) -> None:
        """Apply the log entries after the mirror's last one, other writers' only (this
        process's were applied when acknowledged). Reload in full if the DB was re-seeded
        (epoch), entries it had not read were trimmed away, or META names another version."""
        node = self._net.node(META_SLOT)
        client = self._net.client(node, slow=True)
        m = self._mirror
        while m is not None:
            p = client.pipeline(transaction=True)
            p.get(META).get(EPOCH).xinfo_stream(LOG).xread({LOG: _sids(m.last)}, count=TAIL_COUNT)
            meta, epoch, info, got = p.execute(raise_on_error=False)
            for x in (meta, epoch, got):
                if isinstance(x, Exception):
                    raise x
            if meta != self._v:
                self._mirror_drop(f"{META} is {meta!r}, not {self.version}", node)
                return
            if epoch != m.epoch:
                self._count("mirror_reloads")
                log.warning("redis feature store: DB re-seeded; reloading the item mirror")
                self._mirror = None   # the old counters are void: bundle state until reloaded
                self._mirror_load()
                return
            _, _, trimmed = _log_info(info)
            if trimmed > m.added:
                self._count("mirror_reloads")
                log.warning("redis feature store: item mirror fell behind the log (trimmed); reloading")
                self._mirror_load()
                return
            entries = got[0][1] if got else []
            others = [f for _, f in entries if f.get(b"w") != self._evg]
            if others:
                imp, pos = _split([f[b"i"] for f in others], np.int64), _split([f[b"p"] for f in others], np.int64)
                hot = _split([f[b"h"] for f in others], np.float64)
                with self._m_lock:
                    m.add(imp, pos, hot)
            if entries:
                m.last, m.added = _sid(entries[-1][0]), m.added + len(entries)
            self._m_ok = time.monotonic()
            if len(entries) < TAIL_COUNT:
                return

    def _mirror_load(self) -> bool:
        """Read every item's counters in chunks, each chunk atomically (MULTI) with the id of
        the log's last entry at that moment; then replay the log entries after the oldest of
        those ids, each only onto the chunks read before it. Exact without blocking Redis for
        the whole catalog. The replay's last page runs under the write lock, atomically with
        this process's sequence key, so its own writes are counted once."""
        node = self._net.node(META_SLOT)
        client = self._net.client(node, slow=True)
        meta, epoch = client.pipeline(transaction=False).get(META).get(EPOCH).execute()
        if meta != self._v:
            self._mirror_drop(f"{META} is {meta!r}, not {self.version}", node)
            return False
        t0, n = time.monotonic(), self._n_items
        m = _Mirror(n, epoch)
        read = np.zeros((-(-n // MIRROR_CHUNK), 3), np.int64)   # per chunk: log id it was read at, entries
        for c, lo in enumerate(range(0, n, MIRROR_CHUNK)):
            hi = min(n, lo + MIRROR_CHUNK)
            f = list(range(lo, hi))
            p = client.pipeline(transaction=True)
            p.get(META).get(EPOCH).hmget(IMP, f).hmget(POS, f).zmscore(HOT, f).xinfo_stream(LOG)
            meta, ep, imp, pos, hot, info = p.execute(raise_on_error=False)
            for x in (meta, ep, imp, pos, hot):
                if isinstance(x, Exception):
                    raise x
            if meta != self._v or ep != epoch:
                return False
            m.imp[lo:hi], m.pos[lo:hi], m.hot[lo:hi] = _numbers(imp), _numbers(pos), _numbers(hot)
            last, added, _ = _log_info(info)
            read[c] = (*last, added)
        first = read[np.lexsort((read[:, 1], read[:, 0]))[0]].tolist()
        base, base_added = (first[0], first[1]), first[2]
        cursor, added = base, base_added

        def replay(c: redis.Redis) -> tuple[bool, object]:
            """One page of log entries after `cursor` onto the chunks read before each; whether
            the log's end was reached, and this process's sequence key read with it."""
            nonlocal cursor, added
            p = c.pipeline(transaction=True)
            p.get(META).get(EPOCH).get(self._evg).xinfo_stream(LOG)
            p.xrange(LOG, min=f"({_sids(cursor)}", max="+", count=TAIL_COUNT)
            meta, ep, own, info, entries = p.execute(raise_on_error=False)
            for x in (meta, ep, own, entries):
                if isinstance(x, Exception):
                    raise x
            if meta != self._v or ep != epoch:
                raise RedisError("the DB was re-seeded or taken over while the mirror was loading")
            if _log_info(info)[2] > base_added:
                raise RedisError("item log trimmed while the mirror was loading")
            for eid, fields in entries:
                e = np.array(_sid(eid))
                later = (read[:, 0] < e[0]) | ((read[:, 0] == e[0]) & (read[:, 1] < e[1]))  # chunks before it
                imp, pos = _split([fields[b"i"]], np.int64), _split([fields[b"p"]], np.int64)
                hot = _split([fields[b"h"]], np.float64)
                keep = later[pos // MIRROR_CHUNK]
                m.add(imp[later[imp // MIRROR_CHUNK]], pos[keep], hot[keep])
            if entries:
                cursor, added = _sid(entries[-1][0]), added + len(entries)
            return len(entries) < TAIL_COUNT, own

        while not replay(client)[0]:   # catch up without holding the event path
            pass
        with self._wlock:   # the last page: atomically with this process's sequence key, on the 50 ms
            done, own = replay(self._net.client(node))   # client (the event path waits on this lock)
            if not done:
                raise RedisError("item log growing faster than the mirror loads it; retrying")
            m.last, m.added = cursor, added
            with self._m_lock:
                self._m_own = max(int(own or 0), self._acked.get(META_SLOT, 0))
                self._mirror = m
            self._m_ok = time.monotonic()
        self._count("mirror_loads")
        log.info("redis feature store: item mirror loaded (%d items, %.0f ms)", n, (time.monotonic() - t0) * 1e3)
        return True

    def _mirror_own(self, e: _Entry) -> None:
        """An acknowledged sub-batch of this process for slot g: its item ops, into the mirror
        now (read-your-writes), unless the mirror already holds it (loaded after it landed)."""
        if e.unit != META_SLOT or e.seq <= self._m_own:
            return
        ops = e.args[1 + 3 * e.args[0]:]
        flags, items = np.array(ops[0::3], np.int64), np.array(ops[1::3], np.int64)
        pos = flags >= 2
        with self._m_lock:
            self._m_own = e.seq
            if self._mirror is not None:
                self._mirror.add(items[flags % 2 == 1], items[pos],
                                 np.array([float(w) for w in ops[2::3]], np.float64)[pos])

    # -- bookkeeping ------------------------------------------------------------------
    def _lost(self, reason: object, node: str | None = None) -> None:
        """`node` unusable: its users are served from the bundle; None: the whole store is."""
        if node is None:
            if self._ready:
                log.warning("redis feature store unavailable (%s): serving the bundle's state, buffering events",
                            reason)
            self._ready = False
        elif node not in self._down:
            if self._ready:
                log.warning("redis feature store: %s unavailable (%s): serving the bundle's state for its users, "
                            "buffering their events", node, reason)
            self._down.add(node)

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
        while self._queued and time.monotonic() < end:
            try:
                self._recover()
            except _ERRORS:
                pass
            if self._queued:
                time.sleep(RETRY_S)
        if self._queued:
            log.error("redis feature store closed with %d events still buffered (Redis unreachable): "
                      "they are lost", self._queued)
        self._net.close()
