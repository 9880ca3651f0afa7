"""The Lua scripts the Redis loader runs on the server: the lock, range deletes and moves, the refresh flip, reads.

Each script runs atomically. SWEEP, DISCARD, TRIM and the reads do a page per call, so that the server never blocks
long on them; the caller calls again until they are done.

Fencing. Every script that changes a table under its lock checks first that the lock still holds the writer's
token, and changes nothing otherwise (it returns -2): a writer that lost its lock (its heartbeat stalled past the
lease) cannot change the table after another writer took over. These scripts take the table's meta hash as
``KEYS[1]``, its lock as ``KEYS[2]``, the token as ``ARGV[1]`` and the table's key base ``P:`` as ``ARGV[2]``.
"""

_FENCE = "if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -2 end\n"

_DROP = """local function drop(area, lo, hi, limit)
  local n, seen = 0, 0
  while seen < limit do
    local m = redis.call('ZRANGE', area, lo, hi, 'BYSCORE', 'LIMIT', 0, 1000)
    if #m == 0 then break end
    local keys = {}
    for i, k in ipairs(m) do keys[i] = area .. ':' .. k end
    n = n + redis.call('UNLINK', unpack(keys))
    redis.call('ZREM', area, unpack(m))
    seen = seen + #m
  end
  return n
end
"""

# -- the lock: KEYS lock, owner -----------------------------------------------------------------------------

# ARGV token, lease (ms), the client id of the writer's raw socket. Take the lock if it is free: {1, the owner
# left by a holder that never released it, or ''}; else {0, milliseconds until it expires (-1: never)}
ACQUIRE = """if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local before = redis.call('GET', KEYS[2]) or ''
  redis.call('SET', KEYS[2], ARGV[3])
  return {1, before}
end
return {0, redis.call('PTTL', KEYS[1])}"""
# renew (ARGV[2] = milliseconds) or release (ARGV[2] = 0) the lock, only while it holds this writer's token
LEASE = """if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('DEL', KEYS[1], KEYS[2]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])"""

# -- fenced changes: KEYS meta, lock; ARGV token, key base ----------------------------------------------------

# a fresh area, listed in meta as a stage before anything is written into it
STAGE = (
    _FENCE
    + """local stage = 'g' .. redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('HSET', KEYS[1], 'stage:' .. stage, 1)
return stage"""
)
# KEYS[3] the stage area; ARGV low, high, stage. Delete the range from the live area (read here, not by the
# caller), move every staged row in (RENAME keeps its TTL), unlist the stage. -1: the stage was dropped as dead;
# a stage already moved (a retry after a lost reply) changes nothing.
MOVE = (
    _DROP
    + _FENCE
    + """if redis.call('HEXISTS', KEYS[1], 'stage:' .. ARGV[5]) == 0 then
  return redis.call('HGET', KEYS[1], 'moved') == ARGV[5] and 0 or -1
end
local live = ARGV[2] .. redis.call('HGET', KEYS[1], 'live')
local n = drop(live, ARGV[3], ARGV[4], math.huge)
while true do
  local m = redis.call('ZRANGE', KEYS[3], 0, 999, 'WITHSCORES')
  if #m == 0 then break end
  local add, rem = {}, {}
  for i = 1, #m, 2 do
    redis.pcall('RENAME', KEYS[3] .. ':' .. m[i], live .. ':' .. m[i])  -- a staged row may have expired
    add[#add + 1] = m[i + 1]; add[#add + 1] = m[i]; rem[#rem + 1] = m[i]
  end
  redis.call('ZADD', live, unpack(add))
  redis.call('ZREM', KEYS[3], unpack(rem))
end
redis.call('HDEL', KEYS[1], 'stage:' .. ARGV[5])
redis.call('HSET', KEYS[1], 'moved', ARGV[5])
return n"""
)
# ARGV stage, then the table's settings as field/value pairs. The old area is listed as a stage, so that it is
# dropped even if this writer dies before dropping it. Codes as in MOVE.
FLIP = (
    _FENCE
    + """local live = redis.call('HGET', KEYS[1], 'live')
if live == ARGV[3] then return 0 end
if redis.call('HDEL', KEYS[1], 'stage:' .. ARGV[3]) == 0 then return -1 end
if live then redis.call('HSET', KEYS[1], 'stage:' .. live, 1) end
redis.call('HSET', KEYS[1], 'live', ARGV[3], unpack(ARGV, 4))
return 1"""
)
# ARGV low, high (scores): delete the range from the live area
DELETE = _DROP + _FENCE + "return drop(ARGV[2] .. redis.call('HGET', KEYS[1], 'live'), ARGV[3], ARGV[4], math.huge)"
# ARGV low, high (stream IDs): XDEL the range from the live stream, then set the stream's last ID back to its top
# entry so that the range can be appended again
XDELETE = (
    _FENCE
    + """local area, n = ARGV[2] .. redis.call('HGET', KEYS[1], 'live'), 0
while true do
  local e = redis.call('XRANGE', area, ARGV[3], ARGV[4], 'COUNT', 1000)
  if #e == 0 then break end
  local ids = {}
  for i, x in ipairs(e) do ids[i] = x[1] end
  n = n + redis.call('XDEL', area, unpack(ids))
end
if redis.call('EXISTS', area) == 1 then
  local top = redis.call('XREVRANGE', area, '+', '-', 'COUNT', 1)
  redis.call('XSETID', area, top[1] and top[1][1] or '0-0')
end
return n"""
)
# KEYS[3] a listed stage area; ARGV stage, page. Drop a page of it, and unlist it once it is gone: 1 while there
# is more to drop, then 0. SWEEP drops any listed stage, so it is fenced; DISCARD is for a writer's own stage,
# which no one else writes, so a writer that lost its lock still cleans up after itself.
_UNSTAGE = """if redis.call('TYPE', KEYS[3]).ok == 'stream' then redis.call('UNLINK', KEYS[3])
else drop(KEYS[3], '-inf', '+inf', tonumber(ARGV[4])) end
if redis.call('EXISTS', KEYS[3]) == 1 then return 1 end
redis.call('HDEL', KEYS[1], 'stage:' .. ARGV[3])
return 0"""
SWEEP = _DROP + _FENCE + _UNSTAGE
DISCARD = _DROP + _UNSTAGE
# KEYS[3] the TTL list; ARGV now (s), page. Unindex the rows due to expire by now that are gone; a row still there
# (written again since, or by a client whose clock runs ahead) is listed again for when it expires
TRIM = (
    _FENCE
    + """local area = ARGV[2] .. redis.call('HGET', KEYS[1], 'live')
local due = redis.call('ZRANGE', KEYS[3], '-inf', ARGV[3], 'BYSCORE', 'LIMIT', 0, ARGV[4])
for _, k in ipairs(due) do
  local left = redis.call('PTTL', area .. ':' .. k)
  if left == -2 then redis.call('ZREM', area, k) end
  if left > 0 then redis.call('ZADD', KEYS[3], ARGV[3] + left / 1000, k) else redis.call('ZREM', KEYS[3], k) end
end
return #due"""
)

# -- reads: KEYS area ----------------------------------------------------------------------------------------

# reads answer one page as two strings, all values and their int32 lengths (-1 = null), so Python parses
# no value one by one
_PUT = """local vals, lens = {}, {}
local function put(v) vals[#vals + 1] = v or ''; lens[#lens + 1] = struct.pack('<i4', v and #v or -1) end
"""
# rows by index rank (the range column first: absent means the row expired)
READ = (
    _PUT
    + """for _, k in ipairs(redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2])) do
  local v = redis.call('HMGET', KEYS[1] .. ':' .. k, unpack(ARGV, 3))
  if v[1] then for i = 1, #ARGV - 2 do put(v[i]) end end
end
return {table.concat(vals), table.concat(lens)}"""
)
XREAD = (
    _PUT
    + """local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
for _, x in ipairs(e) do
  local row = {}
  for i = 1, #x[2], 2 do row[x[2][i]] = x[2][i + 1] end
  for i = 4, #ARGV do put(row[ARGV[i]]) end
end
return {table.concat(vals), table.concat(lens), #e > 0 and e[#e][1] or ''}"""
)
