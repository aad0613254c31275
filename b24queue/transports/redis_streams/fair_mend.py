"""Fair queues on Redis: entries parked in no portal's list found and queued again (`RECONCILE`),
and the cheap check that says when to look (`UNLISTED`)."""

from __future__ import annotations

from typing import Any

from b24queue import _constants as c
from b24queue.queues import MAX_PORTAL_CHARS
from b24queue.transports.redis_streams.fair import PARK, PRELUDE
from b24queue.transports.redis_streams.scripts import ALLOW_OOM, GROUP

# How many of the parking consumer's pending entries one `RECONCILE` call looks at (about 10 us
# each, measured with the client's round trip: a call takes 2-6 ms); `UNLISTED` reads this many
# portals at most.
MEND_AT_MOST = 200
CHECK_PORTALS_AT_MOST = 10_000
# Entries parked whose ids are in no portal's list (the fair keys lost: deleted, or a Redis
# restarted from a copy that had the stream but not them) would wait forever: each call looks at the
# next `MEND_AT_MOST` pending entries of the parking consumer, from where the last one stopped
# (`:mend`), and adds those in no list to the stream again, as new entries (the old ones acked and
# deleted), which the next fair claim parks; a portal with entries in its list but not in the turns
# is put back in them. A list holds its ids in the order they were parked (new entries at its tail,
# entries taken over at its head), so an entry is in no list when its portal has none or it is older
# than the list's head; one older than the head can still be in the list only after entries were
# taken over in an order it cannot keep, and then adding it again as a copy gives it once all the
# same (the id left in the list is no longer parked when reached: skipped). An entry in no list but
# newer than the head of a list its portal got since (from entries taken over) is found by a pass
# after that head has been given. KEYS[1] stream. ARGV: group, the parking consumer, the member_id
# header, the portal's length at most, how many entries to look at. Returns {entries looked at,
# added again, gone (deleted from the stream: acked), 1 when it reached the end (the next call
# starts again from the first)}.
RECONCILE = (
    ALLOW_OOM
    + """
local stream, group, park, member = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local chars, n = tonumber(ARGV[4]), tonumber(ARGV[5])
"""
    + PRELUDE
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


def reconcile_args(at_most: int = MEND_AT_MOST) -> list[Any]:
    """RECONCILE's ARGV (KEYS: the stream)."""
    return [GROUP, PARK, c.H_MEMBER_ID, MAX_PORTAL_CHARS, at_most]


# Whether the parking consumer holds more entries than the portals in the turns have ids in
# their lists: some are then parked in no list (or a portal is out of the turns); read in one
# script, so that no claim comes between what it compares. 1 too when there are more portals
# than it reads. A list may hold a few ids no longer parked (given by a first-in-first-out
# claim), which can hide as many entries in no list until they are reached; a runner's start
# looks for them all. KEYS[1] stream. ARGV: group, the parking consumer, portals read at most.
UNLISTED = """#!lua flags=no-writes,allow-oom
local stream, park, most = KEYS[1], ARGV[2], tonumber(ARGV[3])
local summary = redis.pcall('XPENDING', stream, ARGV[1])
if summary.err then return 0 end  -- no group yet
local parked = 0
if type(summary[4]) == 'table' then
  for _, c in ipairs(summary[4]) do
    if c[1] == park then parked = tonumber(c[2]) end
  end
end
local portals = redis.call('ZRANGE', stream .. ':ready', 0, most)
if #portals > most then return 1 end
local listed = 0
for _, portal in ipairs(portals) do
  listed = listed + redis.call('LLEN', stream .. ':fair:' .. portal)
end
if parked > listed then return 1 end
return 0
"""


def unlisted_args() -> list[Any]:
    """UNLISTED's ARGV (KEYS: the stream)."""
    return [GROUP, PARK, CHECK_PORTALS_AT_MOST]
