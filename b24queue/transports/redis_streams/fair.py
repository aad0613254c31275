"""Fair claims on Redis Streams (docs/fairness.md; the rule of b24queue.transports.kit.fair): their
scripts, and `status`'s portals waiting.

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

import redis.asyncio as aioredis
from redis import exceptions as rx

from b24queue import _constants as c
from b24queue.queues import MAX_PORTAL_CHARS
from b24queue.transports.kit import tables
from b24queue.transports.redis_streams.scripts import ALLOW_OOM, GROUP, NOW
from b24queue.transports.status import PortalCount, PortalsWaiting

PARK = "~parked"

# How many new entries a fair claim parks in the portals' lists at a time (5 times that at most
# in one claim, when every portal parked is capped or done and more came): a flood published at
# once is parked over several claims (each costs about this many entries' work), so a quiet
# portal's event behind it waits for those claims, once.
PARK_AT_MOST = 1000
# How many entries of runners gone quiet a fair claim takes over (parks again) at most.
TAKE_OVER_AT_MOST = 100
# How many of the parking consumer's pending entries one `RECONCILE` call looks at (about 10 us
# each: Redis is busy 2-3 ms a call); `parked_unlisted` reads this many portals at most.
MEND_AT_MOST = 200
CHECK_PORTALS_AT_MOST = 10_000
# `status` (`PORTALS`): how many entries not parked yet (the stream past the group's last read)
# and how many retries waiting it reads, for their portals.
UNPARKED_READ = 1000

# The names beside the stream; the portal of an entry's headers (`portal_of`), read as Python
# writes the JSON by a pattern (about 4 times cheaper than decoding it), decoded only when that
# does not match; `enter`: a portal with entries parked takes its place in the turns (at its
# pass, if that is still past the clock; else at the clock); `before`: stream id order.
_FAIR = """
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
    + _FAIR
    + """
local holding = stream .. ':holding'
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, member_json in ipairs(due) do
  local f = cjson.decode(member_json)
  redis.call('XADD', stream, '*', 'm', f.m, 'k', f.k, 'b', f.b, 'h', f.h, 't', f.t, 'e', f.e)
  redis.call('ZREM', KEYS[2], member_json)
end
-- Passes at or below the clock mean nothing. Before 0.9 `:passes` was a hash of every portal
-- that ever emptied (and a held set each, with a cap): its portals are swept once.
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

# Entries parked whose ids are in no portal's list (the fair keys lost: deleted, or a Redis
# restarted from a copy that had the stream but not them) would wait forever: each call looks
# at the next `MEND_AT_MOST` pending entries of the parking consumer, from where the last one
# stopped (`:mend`), and adds those in no list to the stream again, as new entries (the old
# ones acked and deleted), which the next fair claim parks; a portal with entries in its list
# but not in the turns is put back in them. A list holds its ids in the order they were parked
# (new entries at its tail, entries taken over at its head), so an entry is in no list when its
# portal has none or it is older than the list's head; one older than the head can still be in
# the list only after entries were taken over in an order it cannot keep, and then adding it
# again as a copy gives it once all the same (the id left in the list is no longer parked when
# reached: skipped). KEYS[1] stream. ARGV: group, the parking consumer, the member_id header,
# the portal's length at most, how many entries to look at. Returns {entries looked at, added
# again, gone (deleted from the stream: acked), 1 when it reached the end (the next call starts
# again from the first)}.
RECONCILE = (
    ALLOW_OOM
    + """
local stream, group, park, member = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local chars, n = tonumber(ARGV[4]), tonumber(ARGV[5])
"""
    + _FAIR
    + """
local mend = stream .. ':mend'
local after = redis.call('GET', mend) or '0-0'
local pending = redis.call('XPENDING', stream, group, '(' .. after, '+', n, park)
local again, gone = 0, 0
local seen = {}
for _, p in ipairs(pending) do
  local id = p[1]
  local rows = redis.call('XRANGE', stream, id, id)
  if rows[1] == nil then
    redis.call('XACK', stream, group, id)
    gone = gone + 1
  else
    local portal = portal_of(rows[1][2])
    local head = redis.call('LINDEX', list(portal), 0)
    if not head or before(id, head) then
      local f = {}
      local raw = rows[1][2]
      for i = 1, #raw, 2 do f[raw[i]] = raw[i + 1] end
      redis.call('XADD', stream, '*', 'm', f.m, 'k', f.k, 'b', f.b, 'h', f.h, 't', f.t, 'e', f.e)
      redis.call('XACK', stream, group, id)
      redis.call('XDEL', stream, id)
      again = again + 1
    elseif not seen[portal] then
      seen[portal] = true
      enter(portal)
    end
  end
  after = id
end
local finished = #pending < n
if finished then after = '0-0' end
redis.call('SET', mend, after)
return {#pending, again, gone, finished and 1 or 0}
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


def reconcile_args(at_most: int = MEND_AT_MOST) -> list[Any]:
    """RECONCILE's ARGV (KEYS: the stream)."""
    return [GROUP, PARK, c.H_MEMBER_ID, MAX_PORTAL_CHARS, at_most]


async def parked_unlisted(client: aioredis.Redis, stream: str) -> bool:
    """Whether the parking consumer holds more entries than the portals in the turns have ids
    in their lists: some are then parked in no list (or a portal is out of the turns). True
    too when there are more portals than it reads. A list may hold a few ids no longer parked
    (given by a first-in-first-out claim), which can hide as many entries in no list until
    they are reached; a runner's start looks for them all."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.xpending(stream, GROUP)
        pipe.zrange(stream + ":ready", 0, CHECK_PORTALS_AT_MOST)
        try:
            pending, portals = await pipe.execute()
        except rx.ResponseError:  # no group yet
            return False
    parked = sum(
        int(x["pending"]) for x in pending.get("consumers") or [] if _text(x["name"]) == PARK
    )
    if len(portals) > CHECK_PORTALS_AT_MOST:
        return True
    async with client.pipeline(transaction=False) as pipe:
        for portal in portals:
            pipe.llen(f"{stream}:fair:{_text(portal)}")
        listed = sum(int(n) for n in await pipe.execute())
    return parked > listed


# `status`'s portals of a consumer queue, read in one script (reading the entries into Python
# would cost 20 times more): those with entries parked (the first `portals` of `:ready`, each
# counted by its list's length, which may still hold a few ids given out of turn meanwhile),
# then those of the first `entries` not parked yet (the stream past the group's last read: all
# of a first-in-first-out queue's waiting entries) and of as many retries waiting. KEYS[1]
# stream, KEYS[2] its delayed set. ARGV: the member_id header, the portal's length at most,
# portals, entries. Returns {1 when it did not read everything, then portal, count, 1 when
# counted from a read cut short, ...}.
PORTALS = (
    "#!lua flags=no-writes\n"
    + """
local stream, member, chars = KEYS[1], ARGV[1], tonumber(ARGV[2])
local portals, entries = tonumber(ARGV[3]), tonumber(ARGV[4])
"""
    + _FAIR
    + """
local counts, cut_short, order = {}, {}, {}
local function add(portal, n, short)
  if counts[portal] == nil then
    counts[portal] = 0
    order[#order + 1] = portal
  end
  counts[portal] = counts[portal] + n
  if short then cut_short[portal] = true end
end
local parked = redis.call('ZRANGE', ready, 0, portals)
local more = #parked > portals
for i = 1, math.min(#parked, portals) do
  add(parked[i], redis.call('LLEN', list(parked[i])), false)
end
local start = '-'
local groups = redis.pcall('XINFO', 'GROUPS', stream)
if groups.err == nil then
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == ARGV[5] then start = '(' .. info['last-delivered-id'] end
  end
end
local tail = redis.call('XRANGE', stream, start, '+', 'COUNT', entries)
local short = #tail >= entries
for _, e in ipairs(tail) do add(portal_of(e[2]), 1, short) end
local retries = redis.call('ZRANGE', KEYS[2], 0, entries - 1)
local short_retries = #retries >= entries
for _, m in ipairs(retries) do
  local ok, f = pcall(cjson.decode, m)
  local portal = ''
  if ok and type(f) == 'table' and type(f.h) == 'string' then portal = portal_of({'h', f.h}) end
  add(portal, 1, short_retries)
end
local out = {0}
if more or short or short_retries then out[1] = 1 end
for _, portal in ipairs(order) do
  out[#out + 1] = portal
  out[#out + 1] = counts[portal]
  out[#out + 1] = cut_short[portal] and 1 or 0
end
return out
"""
)


def portals_args() -> list[Any]:
    """PORTALS's ARGV (KEYS: the stream and its delayed set)."""
    return [c.H_MEMBER_ID, MAX_PORTAL_CHARS, tables.PORTALS_READ, UNPARKED_READ, GROUP]


def portals_waiting(found: list[Any]) -> PortalsWaiting:
    """What PORTALS returned, within `kit.tables`'s bounds: a count read cut short is "at
    least"."""
    waiting = []
    for i in range(1, len(found), 3):
        n = int(found[i + 1])
        if n > 0:
            more = n > tables.PORTAL_EVENTS_READ or found[i + 2] == 1
            portal = bytes(found[i]).decode(errors="replace")
            waiting.append(PortalCount(portal, min(n, tables.PORTAL_EVENTS_READ), more))
    top = sorted(waiting, key=lambda p: (-p.waiting, p.portal))[: tables.TOP_PORTALS]
    return PortalsWaiting(len(waiting), found[0] == 1, top)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
