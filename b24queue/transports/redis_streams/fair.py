"""Fair claims on Redis Streams (docs/fairness.md; the rule of b24queue.transports.kit.fair): their
scripts (finding entries parked in no list: `fair_mend.py`; `status`'s portals: `fair_status.py`).

A fair queue keeps the one stream and the one group: new entries are read into the group by a
parking consumer (`PARK`), their ids kept in a list per portal (`<stream>:fair:<portal>`, in
the order they were parked), and a claim moves the ones it gives from the parking consumer to
the runner (`XCLAIM ... JUSTID`: their delivery count stays). So leases, heartbeats,
settlements, retries and the DLQ are the FIFO queue's, and an event waiting in a queue made
before fair claims is simply parked by the first fair claim. Beside the stream: `:ready` (a
sorted set of the portals with entries parked, each at the start of its next turn), `:clock`
(the start of the last turn given), `:passes` (a sorted set: the pass of a portal that emptied,
only while it is past the clock: one at or below it means nothing, a portal coming back starts
at the clock then), `:held:<portal>` (with a cap: the ids it was given; those no longer in a
handler dropped when counted) and `:holding` (the portals with such a set, by when they were
last given one: every claim sweeps two not given one for a second, and a set left empty goes),
`:mend` (how
far `RECONCILE` has come). These keys are named inside the scripts, not in KEYS: one Redis, not
a cluster (as the queue's other keys). Each script may run over maxmemory (`scripts.ALLOW_OOM`):
it moves entries Redis holds, and adds about a hundred bytes per event waiting (its id in a
list, a pending entry of the parking consumer).
"""

from __future__ import annotations

from typing import Any

from b24queue import _constants as c
from b24queue.queues import MAX_PORTAL_CHARS
from b24queue.transports.redis_streams.scripts import ALLOW_OOM, GROUP, NOW

PARK = "~parked"

# How many new entries a fair claim parks in the portals' lists at a time (5 times that at most
# in one claim, when every portal parked is capped or done and more came): a flood published at
# once is parked over several claims (each costs about this many entries' work), so a quiet
# portal's event behind it waits for those claims, once.
PARK_AT_MOST = 1000
# How many entries of runners gone quiet a fair claim takes over (parks again) at most.
TAKE_OVER_AT_MOST = 100
# The names beside the stream; the portal of an entry's headers (`portal_of`), read as Python
# writes the JSON by a pattern (about 4 times cheaper than decoding it), decoded only when that
# does not match; `enter`: a portal with entries parked takes its place in the turns (at its
# pass, if that is still past the clock; else at the clock); `before`: stream id order.
PRELUDE = """
local ready, clock_key, passes = stream .. ':ready', stream .. ':clock', stream .. ':passes'
local function list(portal) return stream .. ':fair:' .. portal end
local function held(portal) return stream .. ':held:' .. portal end
local pattern = '"' .. string.gsub(member, '%p', '%%%0') .. '": "([^"\\\\]*)"'
local function portal_of(raw)
  local headers = ''
  for i = 1, #raw, 2 do
    if raw[i] == 'h' then headers = raw[i + 1] end
  end
  if not string.find(headers, member, 1, true) then return '' end
  local found = string.match(headers, pattern)
  if found == nil then
    local ok, h = pcall(cjson.decode, headers)
    if ok and type(h) == 'table' and type(h[member]) == 'string' then found = h[member] end
  end
  found = found or ''
  if #found <= chars then return found end
  local n = 0  -- cut to `chars` characters (UTF-8), as Python's queues.portal_key
  for i = 1, #found do
    local b = string.byte(found, i)
    if b < 128 or b >= 192 then
      n = n + 1
      if n > chars then return string.sub(found, 1, i - 1) end
    end
  end
  return found
end
local clock = tonumber(redis.call('GET', clock_key) or '0')
local function enter(portal)
  if not redis.call('ZSCORE', ready, portal) then
    local pass = tonumber(redis.call('ZSCORE', passes, portal) or '0')
    redis.call('ZREM', passes, portal)
    redis.call('ZADD', ready, math.max(pass, clock), portal)
  end
end
local function before(a, b)
  local am, an = string.match(a, '(%d+)-(%d+)')
  local bm, bn = string.match(b, '(%d+)-(%d+)')
  if tonumber(am) ~= tonumber(bm) then return tonumber(am) < tonumber(bm) end
  return tonumber(an) < tonumber(bn)
end
"""

# KEYS[1] stream, KEYS[2] its delayed set. ARGV: group, consumer, count, lease ms, the parking
# consumer, how many new entries it parks at a time (`PARK_AT_MOST`), the member_id header, the
# cap per portal (0: none), the weights (JSON object portal -> weight, '' for none), the
# portal's length at most (`queues.MAX_PORTAL_CHARS`), how many entries it takes over at most.
# Returns {id, {fields...}, deliveries} for each entry claimed.
FAIR_CLAIM = (
    ALLOW_OOM
    + NOW
    + """
local stream, group, owner = KEYS[1], ARGV[1], ARGV[2]
local count, lease, park = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local batch, member, cap = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
local weights = {}
if ARGV[9] ~= '' then weights = cjson.decode(ARGV[9]) end
local chars, take_over = tonumber(ARGV[10]), tonumber(ARGV[11])
"""
    + PRELUDE
    + """
local holding = stream .. ':holding'
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, member_json in ipairs(due) do
  local f = cjson.decode(member_json)
  redis.call('XADD', stream, '*', 'm', f.m, 'k', f.k, 'b', f.b, 'h', f.h, 't', f.t, 'e', f.e)
  redis.call('ZREM', KEYS[2], member_json)
end
-- Passes at or below the clock mean nothing. Earlier versions kept `:passes` as a hash of every
-- portal that ever emptied (and, with a cap, a held set each): those portals are swept once.
if redis.call('TYPE', passes).ok == 'hash' then
  for _, portal in ipairs(redis.call('HKEYS', passes)) do
    redis.call('ZADD', holding, 'NX', 0, portal)
  end
  redis.call('DEL', passes)
end
redis.call('ZREMRANGEBYSCORE', passes, '-inf', clock)

-- In a handler: pending, and not (or no longer) parked.
local function in_handler(id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return p[1] ~= nil and p[1][2] ~= park
end
local function count_held(portal)
  local n = 0
  for _, id in ipairs(redis.call('SMEMBERS', held(portal))) do
    if in_handler(id) then n = n + 1 else redis.call('SREM', held(portal), id) end
  end
  return n
end
-- Two of the portals not given a slot for a second: their held sets pruned, gone once empty.
for _, portal in ipairs(redis.call('ZRANGEBYSCORE', holding, '-inf', now - 1000, 'LIMIT', 0, 2)) do
  if count_held(portal) == 0 then
    redis.call('ZREM', holding, portal)
  else
    redis.call('ZADD', holding, now, portal)
  end
end

-- Park what came since the last claim, in the lists of its portals, `n` at most; returns how
-- many it parked.
local function park_new(n)
  local read = redis.call('XREADGROUP', 'GROUP', group, park, 'COUNT', n, 'STREAMS', stream,
    '>')
  if not read then return 0 end
  local by_portal = {}
  for _, entry in ipairs(read[1][2]) do
    local portal = portal_of(entry[2])
    local ids = by_portal[portal]
    if ids == nil then
      ids = {}
      by_portal[portal] = ids
    end
    ids[#ids + 1] = entry[1]
  end
  for portal, ids in pairs(by_portal) do
    redis.call('RPUSH', list(portal), unpack(ids))
    enter(portal)
  end
  return #read[1][2]
end

-- Entries of runners gone quiet (idle past the lease) are parked again (their delivery count
-- goes up: given, they come flagged redelivered), at the head of their portals' lists: they
-- take turns and count against the cap as any other.
local back, taken = {}, 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group)) do
  if taken >= take_over then break end
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['name'] ~= park and tonumber(info['pending']) > 0 then
    local idle = redis.call('XPENDING', stream, group, 'IDLE', lease, '-', '+',
      take_over - taken, info['name'])
    for _, p in ipairs(idle) do
      taken = taken + 1
      local got = redis.call('XCLAIM', stream, group, park, lease, p[1])
      if got[1] and got[1][2] then
        local portal = portal_of(got[1][2])
        back[portal] = back[portal] or {}
        table.insert(back[portal], got[1][1])
        redis.call('SREM', held(portal), got[1][1])
      end
    end
  end
end
for portal, ids in pairs(back) do
  table.sort(ids, before)
  for i = #ids, 1, -1 do redis.call('LPUSH', list(portal), ids[i]) end
  enter(portal)
end

-- The turns: a slot to the portal whose start is the smallest (ties: the name that sorts first).
local out = {}
local capped = {}
local ncapped = 0
local parked = park_new(batch)
local total = parked
while #out < count do
  local top = redis.call('ZRANGE', ready, 0, ncapped, 'WITHSCORES')
  local portal, start = nil, nil
  for i = 1, #top, 2 do
    if not capped[top[i]] then
      portal, start = top[i], tonumber(top[i + 1])
      break
    end
  end
  if portal == nil then
    -- Every portal parked is capped or done: park more, if there is more and room for it.
    if parked < batch or total >= batch * 5 then break end
    parked = park_new(batch)
    total = total + parked
    if parked == 0 then break end
  elseif cap > 0 and redis.call('SCARD', held(portal)) >= cap and count_held(portal) >= cap then
    capped[portal] = true
    ncapped = ncapped + 1
  else
    local given = false
    local id = redis.call('LPOP', list(portal))
    if id then
      local p = redis.call('XPENDING', stream, group, id, id, 1)
      if p[1] ~= nil and p[1][2] == park then
        redis.call('XCLAIM', stream, group, owner, 0, id, 'JUSTID')
        local rows = redis.call('XRANGE', stream, id, id)
        if rows[1] then
          out[#out + 1] = {id, rows[1][2], p[1][4]}
          if cap > 0 then
            redis.call('SADD', held(portal), id)
            redis.call('ZADD', holding, now, portal)
          end
          clock, given = math.max(clock, start), true
        else  -- purged meanwhile
          redis.call('XACK', stream, group, id)
        end
      end  -- else taken by a first-in-first-out claim meanwhile, or parked again as a copy
    end
    local pass = start + 1 / (tonumber(weights[portal]) or 1)
    if redis.call('LLEN', list(portal)) == 0 then
      redis.call('ZREM', ready, portal)
      if given and pass > clock then redis.call('ZADD', passes, pass, portal) end
    elseif given then
      redis.call('ZADD', ready, pass, portal)
    end
  end
end
redis.call('SET', clock_key, clock)
return out
"""
)


def claim_args(owner: str, count: int, lease_s: float, cap: int, weights: str) -> list[Any]:
    """FAIR_CLAIM's ARGV (KEYS: the stream and its delayed set)."""
    return [
        GROUP,
        owner,
        count,
        int(lease_s * 1000),
        PARK,
        PARK_AT_MOST,
        c.H_MEMBER_ID,
        cap,
        weights,
        MAX_PORTAL_CHARS,
        TAKE_OVER_AT_MOST,
    ]
