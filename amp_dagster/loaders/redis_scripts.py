"""The Lua scripts the Redis loader runs on the server: range drops and moves, the refresh flip, the lock, reads.

Each script runs atomically. DROP, TRIM and the reads do a page per call, so that the server never blocks long on
them; the caller calls again until they are done.
"""

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
DROP = _DROP + "return drop(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]))"
# KEYS meta, lock, stage area; ARGV token, low, high, stage, key base. Delete the range from the live area (read
# here, not by the caller), move every staged row in (RENAME keeps its TTL), unlist the stage. -2: the lock is
# lost; -1: the stage was dropped as dead; a stage already moved (a retry after a lost reply) changes nothing.
MOVE = (
    _DROP
    + """if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -2 end
if redis.call('HEXISTS', KEYS[1], 'stage:' .. ARGV[4]) == 0 then
  return redis.call('HGET', KEYS[1], 'moved') == ARGV[4] and 0 or -1
end
local live = ARGV[5] .. redis.call('HGET', KEYS[1], 'live')
local n = drop(live, ARGV[2], ARGV[3], math.huge)
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
redis.call('HDEL', KEYS[1], 'stage:' .. ARGV[4])
redis.call('HSET', KEYS[1], 'moved', ARGV[4])
return n"""
)
# KEYS meta, lock; ARGV token, stage, then the table's settings as field/value pairs. The old area is listed as
# a stage, so that it is dropped even if this writer dies before dropping it. Codes as in MOVE.
FLIP = """if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -2 end
local live = redis.call('HGET', KEYS[1], 'live')
if live == ARGV[2] then return 0 end
if redis.call('HDEL', KEYS[1], 'stage:' .. ARGV[2]) == 0 then return -1 end
if live then redis.call('HSET', KEYS[1], 'stage:' .. live, 1) end
redis.call('HSET', KEYS[1], 'live', ARGV[2], unpack(ARGV, 3))
return 1"""
# renew (ARGV[2] = milliseconds) or release (ARGV[2] = 0) the lock, only while it holds this writer's token
LEASE = """if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])"""
# KEYS meta, exp; ARGV key base, now (s), page. Unindex the rows due to expire by now that are gone; a row still
# there (written again since, or by a client whose clock runs ahead) is listed again for when it expires
TRIM = """local area = ARGV[1] .. redis.call('HGET', KEYS[1], 'live')
local due = redis.call('ZRANGE', KEYS[2], '-inf', ARGV[2], 'BYSCORE', 'LIMIT', 0, ARGV[3])
for _, k in ipairs(due) do
  local left = redis.call('PTTL', area .. ':' .. k)
  if left == -2 then redis.call('ZREM', area, k) end
  if left > 0 then redis.call('ZADD', KEYS[2], ARGV[2] + left / 1000, k) else redis.call('ZREM', KEYS[2], k) end
end
return #due"""
# XDEL the range, then set the stream's last ID back to its top entry so that the range can be appended again
XDROP = """local n = 0
while true do
  local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', 1000)
  if #e == 0 then break end
  local ids = {}
  for i, x in ipairs(e) do ids[i] = x[1] end
  n = n + redis.call('XDEL', KEYS[1], unpack(ids))
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  redis.call('XSETID', KEYS[1], top[1] and top[1][1] or '0-0')
end
return n"""
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
