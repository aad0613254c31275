"""The portal store in Redis, shared by several ingress nodes and workers. Needs
`pip install b24queue[redis]`; persistence is Redis's (use AOF with `appendfsync always` or a
replica for install durability)."""

from __future__ import annotations

from b24queue.auth.record import Grant, PortalRecord, decode_record
from b24queue.secrets.stores import RedisClient


class RedisTokenStore(RedisClient):
    """One JSON value per portal under `prefix` + member_id."""

    def __init__(self, url: str, prefix: str = "b24queue:portal:") -> None:
        super().__init__(url)
        self.prefix = prefix

    async def get(self, member_id: str) -> PortalRecord | None:
        raw = await self._redis().get(self.prefix + member_id)
        return decode_record(raw) if raw else None

    async def remember(self, record: PortalRecord, replacing: str | None = None) -> bool:
        value = record.as_json()
        key = self.prefix + record.member_id
        if replacing is None:
            return bool(await self._redis().set(key, value, nx=True))
        stored = await self._redis().eval(_SET_IF_SAME_LUA, 1, key, replacing, value)
        return bool(stored)

    async def forget(self, member_id: str, token: str | None = None) -> bool:
        key = self.prefix + member_id
        if token is None:
            return bool(await self._redis().delete(key))
        return bool(await self._redis().eval(_DELETE_IF_SAME_LUA, 1, key, token))

    async def refresh_access(self, member_id: str, token: str, grant: Grant) -> bool:
        key = self.prefix + member_id
        args = (token, grant.access_token, str(grant.access_expires), grant.refresh_token)
        done = await self._redis().eval(_REFRESH_ACCESS_LUA, 1, key, *args)
        return bool(done)

    async def refreshed(self, member_id: str, old_refresh: str, grant: Grant) -> bool:
        key = self.prefix + member_id
        args = (old_refresh, grant.access_token, grant.refresh_token, str(grant.access_expires))
        return bool(await self._redis().eval(_REFRESHED_LUA, 1, key, *args))

    async def all(self) -> list[PortalRecord]:
        records = []
        async for key in self._redis().scan_iter(match=self.prefix + "*", count=500):
            raw = await self._redis().get(key)
            if raw:
                records.append(decode_record(raw))
        return sorted(records, key=lambda r: r.installed_at)


# Compare-and-set on the stored token, atomically in Redis.
_SET_IF_SAME_LUA = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['token'] == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_REFRESH_ACCESS_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local r = cjson.decode(v)
if r['token'] ~= ARGV[1] then return 0 end
if (tonumber(r['access_expires']) or 0) >= tonumber(ARGV[3]) then return 0 end
r['access_token'] = ARGV[2]
r['access_expires'] = tonumber(ARGV[3])
if ARGV[4] and ARGV[4] ~= '' then r['refresh_token'] = ARGV[4] end
redis.call('SET', KEYS[1], cjson.encode(r))
return 1
"""
_REFRESHED_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local r = cjson.decode(v)
if ARGV[1] == '' or r['refresh_token'] ~= ARGV[1] then return 0 end
r['access_token'] = ARGV[2]
r['refresh_token'] = ARGV[3]
r['access_expires'] = tonumber(ARGV[4])
redis.call('SET', KEYS[1], cjson.encode(r))
return 1
"""
_DELETE_IF_SAME_LUA = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['token'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
