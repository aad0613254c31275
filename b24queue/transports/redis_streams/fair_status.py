"""Fair queues on Redis: `status`'s portals waiting in a consumer queue (fair or not)."""

from __future__ import annotations

from typing import Any

from b24queue import _constants as c
from b24queue.queues import MAX_PORTAL_CHARS
from b24queue.transports.kit import tables
from b24queue.transports.redis_streams.fair import PRELUDE
from b24queue.transports.redis_streams.scripts import GROUP
from b24queue.transports.status import PortalCount, PortalsWaiting

# `status` (`PORTALS`): how many entries not parked yet (the stream past the group's last read)
# and how many retries waiting it reads, for their portals.
UNPARKED_READ = 1000

# `status`'s portals of a consumer queue, read in one script (reading the entries into Python
# would cost 20 times more): those with entries parked (the first `portals` of `:ready`, each
# counted by its list's length, which may still hold a few ids given out of turn meanwhile),
# then those of the first `entries` not parked yet (the stream past the group's last read: all
# of a first-in-first-out queue's waiting entries) and of as many retries waiting. KEYS[1]
# stream, KEYS[2] its delayed set. ARGV: the member_id header, the portal's length at most,
# portals, entries. Returns {1 when it did not read everything, then portal, count, 1 when
# counted from a read cut short, ...}.
PORTALS = (
    "#!lua flags=no-writes,allow-oom\n"
    + """
local stream, member, chars = KEYS[1], ARGV[1], tonumber(ARGV[2])
local portals, entries = tonumber(ARGV[3]), tonumber(ARGV[4])
"""
    + PRELUDE
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
