"""The Lua scripts of the Redis Streams transport: each queue operation is one script, so it is
atomic (and, with `appendfsync always`, on disk when it returns).

An entry's fields: m message_id, k routing key, b body, h headers (JSON), t accepted at (ISO),
e event type. A consumer queue is a stream with one consumer group (`GROUP`); a worker's runner is
one consumer of it; what it holds is its part of the group's pending entries list (PEL), and the
lease is the PEL's idle time: a heartbeat resets it, `XAUTOCLAIM` takes entries idle longer than
the lease. A settlement is fenced by (entry id, consumer, delivery count), read from the PEL.
Delayed retries wait in a sorted set by due time (ms) and are moved back into the stream by the
claim script once due.

Over `maxmemory` (policy noeviction) Redis refuses whatever may grow memory. New events must be
refused then (PUBLISH, REPLAY: the ingress answers 503 or spools), but draining is what frees
memory, so the scripts a worker needs to start and drain run anyway (`#!lua flags=allow-oom`,
Redis >= 7). None adds an event: DECLARE, CLAIM and BEAT write a few small values of bounded
number (a queue's names, bindings and empty group, once; the claim cursor; one heartbeat per
runner); CLAIM and MOVE move entries Redis holds (a due retry back into its stream; an entry to
its delayed set or DLQ, with its new headers: the error text is cut at 1,000 characters).
The fair claim's scripts (`fair.py`) hold to the same rule.
"""

from __future__ import annotations

GROUP = "workers"

# The unrouted stream's ledger (`<stream>:bytes`: its entries' body bytes; XLEN counts them), kept
# by every script that adds or removes its entries; missing (before `SIZE` counted it once), only
# the count is capped. Written after the entries it counts (over maxmemory Redis refuses a
# script's first write that may grow memory, never a later one: PURGE still purges).
_SHRANK = """
local function shrank(stream, sizes, freed)
  if freed == 0 or redis.call('EXISTS', sizes) == 0 then return end
  if redis.call('DECRBY', sizes, freed) < 0 or redis.call('XLEN', stream) == 0 then
    redis.call('SET', sizes, 0)
  end
end
local function body(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'b' then return #fields[i + 1] end
  end
  return 0
end
"""

# The bindings as the caller read them to route (`version` the key, `expected` what it read;
# '0': none were declared yet): a script routing by them returns -1 when they changed meanwhile.
_CHANGED = """
local function changed(version, expected)
  return redis.call('GET', version) ~= expected and not (expected == '0' and
    redis.call('EXISTS', version) == 0)
end
"""

# KEYS[1] bindings version; KEYS[2..] streams, then the unrouted stream's ledger when it is one
# of them. ARGV[1] expected version, ARGV[2] entries, ARGV[3] the unrouted stream's index into
# KEYS (0: none), ARGV[4] its cap in entries, ARGV[5] in bytes, then per entry: stream index
# (into KEYS), m, k, b, h, t, e. Returns {entries, dropped, bytes dropped}: past the cap, the
# unrouted stream's oldest entries go (each read once: the ledger says how far over it is).
PUBLISH = (
    _SHRANK
    + _CHANGED
    + """
if changed(KEYS[1], ARGV[1]) then return -1 end
local n = tonumber(ARGV[2])
local unrouted = tonumber(ARGV[3])
local added = 0
local at = 6
for i = 1, n do
  local index = tonumber(ARGV[at])
  redis.call('XADD', KEYS[index], '*', 'm', ARGV[at + 1], 'k', ARGV[at + 2],
    'b', ARGV[at + 3], 'h', ARGV[at + 4], 't', ARGV[at + 5], 'e', ARGV[at + 6])
  if index == unrouted then added = added + #ARGV[at + 3] end
  at = at + 7
end
if unrouted == 0 then return {n, 0, 0} end
local stream, sizes = KEYS[unrouted], KEYS[#KEYS]
local max_entries, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local counted = redis.call('EXISTS', sizes) == 1
local size = 0
if counted then size = redis.call('INCRBY', sizes, added) end
local length = redis.call('XLEN', stream)
local dropped, freed = 0, 0
while length > max_entries or size > max_bytes do
  local want = math.max(1, math.min(100, length - max_entries))
  local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', want)
  if #oldest == 0 then
    size = 0
    break
  end
  for _, entry in ipairs(oldest) do
    if length <= max_entries and size <= max_bytes then break end
    local gone = body(entry[2])
    redis.call('XDEL', stream, entry[1])
    length, size = length - 1, size - gone
    dropped, freed = dropped + 1, freed + gone
  end
end
if counted and dropped > 0 then redis.call('SET', sizes, math.max(size, 0)) end
return {n, dropped, freed}
"""
)

# KEYS[1] the unrouted stream, KEYS[2] its ledger. ARGV: the last entry id counted ('0-0' for
# none), the body bytes up to it. Counts what was added since and sets the ledger, unless one
# exists already. Returns 1 when it set it.
SIZE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local total, after = tonumber(ARGV[2]), ARGV[1]
while true do
  local rows = redis.call('XRANGE', KEYS[1], '(' .. after, '+', 'COUNT', 100)
  if #rows == 0 then break end
  for _, row in ipairs(rows) do
    for i = 1, #row[2], 2 do
      if row[2][i] == 'b' then total = total + #row[2][i + 1] end
    end
    after = row[1]
  end
end
redis.call('SET', KEYS[2], total)
return 1
"""

# First line of a script that runs even over maxmemory (see above); Redis < 7 cannot parse it.
ALLOW_OOM = "#!lua flags=allow-oom\n"

NOW = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
"""

# KEYS[1] queues hash, KEYS[2] the queue's stream, KEYS[3] bindings hash, KEYS[4] bindings
# version. ARGV: group, queue, its DLQ, their kinds (queue, DLQ), then the queue's binding
# patterns. The queue, its group and DLQ, and exactly these bindings (the field "queue\npattern");
# returns the patterns removed.
DECLARE = (
    ALLOW_OOM
    + """
redis.call('HSET', KEYS[1], ARGV[2], ARGV[4], ARGV[3], ARGV[5])
local made = redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[1], '0', 'MKSTREAM')
if type(made) == 'table' and made.err and not string.find(made.err, 'BUSYGROUP', 1, true) then
  return made
end
local wanted = {}
for i = 6, #ARGV do wanted[ARGV[i]] = true end
local prefix = ARGV[2] .. '\\n'
local removed = {}
for _, field in ipairs(redis.call('HKEYS', KEYS[3])) do
  if string.sub(field, 1, #prefix) == prefix then
    local pattern = string.sub(field, #prefix + 1)
    if wanted[pattern] then
      wanted[pattern] = false
    else
      redis.call('HDEL', KEYS[3], field)
      removed[#removed + 1] = pattern
    end
  end
end
local changed = #removed
for i = 6, #ARGV do
  if wanted[ARGV[i]] then
    redis.call('HSET', KEYS[3], prefix .. ARGV[i], '1')
    wanted[ARGV[i]] = false
    changed = changed + 1
  end
end
if changed > 0 then redis.call('INCR', KEYS[4]) end
return removed
"""
)

# KEYS[1] stream, KEYS[2] its delayed set, KEYS[3] where XAUTOCLAIM goes on from (it looks at
# about 10 x count pending entries per call: from the oldest every time, an abandoned entry
# behind many live ones would wait). ARGV: group, consumer, count, lease ms.
# Returns {id, {fields...}, deliveries} for each entry claimed.
CLAIM = (
    ALLOW_OOM
    + NOW
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, member in ipairs(due) do
  local f = cjson.decode(member)
  redis.call('XADD', KEYS[1], '*', 'm', f.m, 'k', f.k, 'b', f.b, 'h', f.h, 't', f.t, 'e', f.e)
  redis.call('ZREM', KEYS[2], member)
end
local count = tonumber(ARGV[3])
local out = {}
local cursor = redis.call('GET', KEYS[3]) or '0-0'
local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], cursor,
  'COUNT', count)
redis.call('SET', KEYS[3], claimed[1])
for _, entry in ipairs(claimed[2]) do
  if entry[2] then out[#out + 1] = entry end
end
if #out < count then
  local read = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', count - #out,
    'STREAMS', KEYS[1], '>')
  if read then
    for _, entry in ipairs(read[1][2]) do out[#out + 1] = entry end
  end
end
local result = {}
for _, entry in ipairs(out) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
  result[#result + 1] = {entry[1], entry[2], p[1][4]}
end
return result
"""
)

_HOLDS = """
local function holds(stream, group, id, consumer, deliveries)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return p[1] ~= nil and p[1][2] == consumer and tostring(p[1][4]) == deliveries
end
"""

# KEYS[1] stream. ARGV: group, then (id, consumer, deliveries) per entry. Returns 1/0 each.
ACK = (
    _HOLDS
    + """
local out = {}
for i = 2, #ARGV, 3 do
  if holds(KEYS[1], ARGV[1], ARGV[i], ARGV[i + 1], ARGV[i + 2]) then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""
)

# KEYS[1] stream, KEYS[2] delayed set (retry) or DLQ stream. ARGV: group, id, consumer,
# deliveries, 'retry' or 'dlq', headers JSON, delay ms. Returns 1 when moved.
MOVE = (
    ALLOW_OOM
    + _HOLDS
    + NOW
    + """
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
local rows = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if rows[1] == nil then return 0 end
local f = {}
local raw = rows[1][2]
for i = 1, #raw, 2 do f[raw[i]] = raw[i + 1] end
f.h = ARGV[6]
if ARGV[5] == 'retry' then
  f.o = ARGV[2]
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), cjson.encode(f))
else
  redis.call('XADD', KEYS[2], '*', 'm', f.m, 'k', f.k, 'b', f.b, 'h', f.h, 't', f.t, 'e', f.e)
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""
)

# KEYS[1] stream, KEYS[2] workers hash. ARGV: group, consumer, lease ms, heartbeat JSON (or ''
# to give everything back), then the ids the consumer still handles. Resets their idle time (the
# lease); any other entry it holds (a claim whose answer was lost) becomes claimable at once.
BEAT = (
    ALLOW_OOM
    + """
local held = {}
for i = 5, #ARGV do held[ARGV[i]] = true end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], ARGV[2], ARGV[4]) end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 10000, ARGV[2])
for _, p in ipairs(pending) do
  if held[p[1]] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, p[1], 'JUSTID')
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, p[1], 'IDLE', tonumber(ARGV[3]) * 10,
      'JUSTID')
  end
end
return #pending
"""
)

# KEYS[1] stream, KEYS[2] workers hash. ARGV: group, consumer. The consumer goes from the group
# only when it holds nothing (deleting it would drop its pending entries); else PRUNE takes it
# once what it held was taken over.
LEAVE = """
redis.call('HDEL', KEYS[2], ARGV[2])
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if pending[1] == nil then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return 1
"""

# KEYS[1] stream, KEYS[2] workers hash. ARGV: group, queue, now (s), max age (s). Heartbeats of
# this queue older than max age (crashed workers) go, and so do the group's consumers that hold
# nothing and did nothing for that long (a live runner reads every poll; XREADGROUP would make
# its consumer again anyway).
PRUNE = """
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local seen = cjson.decode(all[i + 1])
  if seen.queue == ARGV[2] and tonumber(ARGV[3]) - seen.seen > tonumber(ARGV[4]) then
    redis.call('HDEL', KEYS[2], all[i])
  end
end
local gone = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if tonumber(info['pending']) == 0 and tonumber(info['idle']) > tonumber(ARGV[4]) * 1000 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    gone = gone + 1
  end
end
return gone
"""

# KEYS[1] the source stream (a DLQ or the unrouted stream), KEYS[2] bindings version, KEYS[3] the
# source's ledger (the unrouted stream's; none for a DLQ), KEYS[4..] targets. ARGV: id, headers
# JSON, expected bindings version. Returns 1 when moved, 0 when the entry is gone, -1 when the
# bindings changed meanwhile.
REPLAY = (
    _SHRANK
    + _CHANGED
    + """
if changed(KEYS[2], ARGV[3]) then return -1 end
local rows = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if rows[1] == nil then return 0 end
local f = {}
local raw = rows[1][2]
for i = 1, #raw, 2 do f[raw[i]] = raw[i + 1] end
for i = 4, #KEYS do
  redis.call('XADD', KEYS[i], '*', 'm', f.m, 'k', f.k, 'b', f.b, 'h', ARGV[2], 't', f.t,
    'e', f.e)
end
redis.call('XDEL', KEYS[1], ARGV[1])
shrank(KEYS[1], KEYS[3], body(raw))
return 1
"""
)

# KEYS[1] stream, KEYS[2] its ledger (if it has one). ARGV: count. Deletes the first `count`
# entries.
PURGE = (
    _SHRANK
    + """
local rows = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', tonumber(ARGV[1]))
local freed = 0
for _, row in ipairs(rows) do
  redis.call('XDEL', KEYS[1], row[1])
  freed = freed + body(row[2])
end
shrank(KEYS[1], KEYS[2], freed)
return #rows
"""
)
