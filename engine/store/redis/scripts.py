"""The Lua scripts of the Redis store, and how they are run: one pipeline per node.

A script declares every key it touches in KEYS, all in one slot, so it runs on a cluster
as on one Redis. What each guarantees (one bundle version, exactly once, in order) is in
docs/feature_store.md, "What a Lua call guarantees".
"""
from __future__ import annotations

import hashlib

import redis
from redis.exceptions import NoScriptError

SEQ_TTL_S = 7 * 86400       # a writer's sequence key outlives its last write this long
LOG_LEN = 20_000            # item:{g}:log entries kept (MAXLEN ~): a mirror further behind reloads


class Script:
    def __init__(self, text: str):
        self.text, self.sha = text, hashlib.sha1(text.encode()).hexdigest()


# KEYS: stamp, sequence key, [item:imp, item:pos, item:hot, item:log if there are item ops], then
# per user: seen, recent, n. ARGV: version, seq, last seq acknowledged to this writer, recent_len,
# seen_len, number of user ops, then per user op: flags (1 impression, 2 primary positive),
# index in KEYS of the user's seen key, item; then per item op: flags, item, hot weight.
APPLY = Script("""
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
CLAIM = Script("""
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
SEED = Script("""
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
RESTAMP = Script("""
local cur = redis.call('GET', KEYS[1])
if cur and cur < ARGV[1] then redis.call('SET', KEYS[1], ARGV[1]) return 1 end
return 0
""")


def run(client: redis.Redis, script: Script, calls: list[tuple[list, list]]) -> list:
    """EVALSHA `script` once per (keys, args) in one pipeline on one node (one round trip).
    Calls that found the script missing (a restarted node's cache is empty) are re-run after
    loading it. Per call: the reply, or the error it got; connection errors raise."""
    def send(batch: list[tuple[list, list]]) -> list:
        p = client.pipeline(transaction=False)
        for keys, args in batch:
            p.evalsha(script.sha, len(keys), *keys, *args)
        return p.execute(raise_on_error=False)

    res = send(calls)
    redo = [i for i, r in enumerate(res) if isinstance(r, NoScriptError)]
    if redo:
        client.script_load(script.text)
        for i, r in zip(redo, send([calls[i] for i in redo])):
            res[i] = r
    return res


def run_all(client: redis.Redis, script: Script, calls: list[tuple[list, list]]) -> list:
    """`run`, raising the first call's error if any failed."""
    res = run(client, script, calls)
    for r in res:
        if isinstance(r, Exception):
            raise r
    return res
