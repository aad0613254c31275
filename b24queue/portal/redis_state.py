"""Portal buckets, held methods and refresh leases in Redis, beside the portal store: one Lua
script per reservation (on Redis's clock, so hosts with skewed clocks still share one bucket),
a hash of held methods per portal (each method's end on Redis's clock), SET NX PX for the lease.
Keys expire once idle; none matches the store's own `b24queue:portal:` prefix."""

from __future__ import annotations

from b24queue.portal.limits import MAX_HELD_METHODS, Limit, method_key
from b24queue.secrets.stores import RedisClient

# KEYS[1] bucket; ARGV: capacity, drain/s, max wait s, idle ms. Returns the wait in microseconds
# as a string, or -1 when over the wait (nothing reserved). Same arithmetic as limits.reserve.
_RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local capacity, drain, max_wait = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'level', 'stamp')
local level = tonumber(state[1]) or 0
local stamp = tonumber(state[2]) or now
level = math.max(0, level - math.max(0, now - stamp) * drain)
local wait = math.max(0, (level + 1 - capacity) / drain)
if wait > max_wait then return -1 end
redis.call('HSET', KEYS[1], 'level', tostring(level + 1), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return math.floor(wait * 1000000)
"""
# KEYS[1] the portal's held methods (method -> end, Redis's clock); ARGV: method, hold s, most.
# Ended holds go; a longer hold already there stays; a new method past the most drops the hold
# that ends first. The hash lives until its last hold ends.
_HOLD_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local method, most = ARGV[1], tonumber(ARGV[3])
local ends = now + tonumber(ARGV[2])
local all = redis.call('HGETALL', KEYS[1])
local count, known, first, first_at = 0, false, nil, nil
for i = 1, #all, 2 do
  local at = tonumber(all[i + 1]) or 0
  if at <= now then
    redis.call('HDEL', KEYS[1], all[i])
  elseif all[i] == method then
    known, count = true, count + 1
    if at > ends then ends = at end
  else
    count = count + 1
    if first_at == nil or at < first_at then first, first_at = all[i], at end
  end
end
if not known and count >= most and first ~= nil then redis.call('HDEL', KEYS[1], first) end
redis.call('HSET', KEYS[1], method, tostring(ends))
local want = math.ceil((ends - now) * 1000) + 1000
if redis.call('PTTL', KEYS[1]) < want then redis.call('PEXPIRE', KEYS[1], want) end
return 1
"""
# KEYS[1] the portal's held methods; ARGV: method. The wait in microseconds (0: not held).
_HELD_LUA = """
local at = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if at == nil then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return math.max(0, math.floor((at - now) * 1000000))
"""
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisState(RedisClient):
    def __init__(self, url: str, prefix: str = "b24queue:portal-state:") -> None:
        super().__init__(url)
        self.prefix = prefix

    async def reserve(self, key: str, limit: Limit) -> float | None:
        args = (limit.capacity, limit.drain_per_s, limit.max_wait_s, int(limit.idle_s * 1000))
        micros = int(
            await self._redis().eval(_RESERVE_LUA, 1, self.prefix + "bucket:" + key, *args)
        )
        return None if micros < 0 else micros / 1_000_000

    async def hold(self, key: str, method: str, for_s: float) -> None:
        held = self.prefix + "held:" + key
        await self._redis().eval(_HOLD_LUA, 1, held, method_key(method), for_s, MAX_HELD_METHODS)

    async def held(self, key: str, method: str) -> float:
        held = self.prefix + "held:" + key
        micros = int(await self._redis().eval(_HELD_LUA, 1, held, method_key(method)))
        return micros / 1_000_000

    async def lease(self, key: str, owner: str, ttl_s: float) -> bool:
        key = self.prefix + "lease:" + key
        return bool(await self._redis().set(key, owner, nx=True, px=max(1, int(ttl_s * 1000))))

    async def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        ttl_ms = max(1, int(ttl_s * 1000))
        key = self.prefix + "lease:" + key
        return bool(await self._redis().eval(_RENEW_LUA, 1, key, owner, ttl_ms))

    async def release(self, key: str, owner: str) -> None:
        await self._redis().eval(_RELEASE_LUA, 1, self.prefix + "lease:" + key, owner)
