"""Portal buckets and refresh leases in Redis, beside the portal store: one Lua script per
reservation (on Redis's clock, so hosts with skewed clocks still share one bucket), SET NX PX
for the lease. Keys expire once idle; none matches the store's own `b24queue:portal:` prefix."""

from __future__ import annotations

from b24queue.portal.limits import Limit
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

    async def lease(self, key: str, owner: str, ttl_s: float) -> bool:
        key = self.prefix + "lease:" + key
        return bool(await self._redis().set(key, owner, nx=True, px=max(1, int(ttl_s * 1000))))

    async def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        ttl_ms = max(1, int(ttl_s * 1000))
        key = self.prefix + "lease:" + key
        return bool(await self._redis().eval(_RENEW_LUA, 1, key, owner, ttl_ms))

    async def release(self, key: str, owner: str) -> None:
        await self._redis().eval(_RELEASE_LUA, 1, self.prefix + "lease:" + key, owner)
