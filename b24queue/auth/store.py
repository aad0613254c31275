"""Per-portal application tokens, learned from ONAPPINSTALL and kept per member_id.

A Bitrix24 app installed on many portals gets a different `application_token` from each, first
in its ONAPPINSTALL event. The store remembers it (durably, before the ingress answers) so every
later event of that portal can be compared with it. Tokens are never logged; `list` returns them
only for the verifier, and `PortalRecord.__repr__` hides them.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from b24queue._files import private_file
from b24queue.errors import ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis


@dataclass(frozen=True, slots=True)
class PortalRecord:
    """A portal that installed the app. `access_token` (expiring at `access_expires`, unix
    seconds) is the freshest one its verified events brought: what lets the ingress ask the
    portal about an event that carries no application token (ONAPPPAYMENT)."""

    member_id: str
    domain: str
    token: str = field(repr=False)
    installed_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    access_token: str = field(default="", repr=False)
    access_expires: int = 0

    def as_json(self) -> str:
        return json.dumps(
            {
                "member_id": self.member_id,
                "domain": self.domain,
                "token": self.token,
                "installed_at": self.installed_at,
                "access_token": self.access_token,
                "access_expires": self.access_expires,
            }
        )


class TokenStore(Protocol):
    """Writes are compare-and-set, so two ingress processes (or nodes) handling installs of one
    portal at once cannot overwrite each other's decision."""

    async def get(self, member_id: str) -> PortalRecord | None: ...

    async def remember(self, record: PortalRecord, replacing: str | None = None) -> bool:
        """Store `record` if the portal is unknown (`replacing` None), or if its stored token is
        still `replacing`. True when stored; durable before it returns."""

    async def forget(self, member_id: str, token: str | None = None) -> bool:
        """Forget the portal (only while its token is `token`, when given)."""

    async def refresh_access(
        self, member_id: str, token: str, access_token: str, access_expires: int
    ) -> bool:
        """Keep a fresher access token, while the portal's token is still `token` and the stored
        access token expires sooner."""

    async def all(self) -> list[PortalRecord]: ...

    async def close(self) -> None: ...


class SqliteTokenStore:
    """One file for one ingress node (WAL, fsync at every commit)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="b24queue-portals")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            private_file(self.path)  # every portal's token is in here
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS portals (member_id TEXT PRIMARY KEY, "
                "domain TEXT NOT NULL, token TEXT NOT NULL, installed_at TEXT NOT NULL)"
            )
            have = {row[1] for row in db.execute("PRAGMA table_info(portals)")}
            for column, kind in (("access_token", "TEXT"), ("access_expires", "INTEGER")):
                if column not in have:  # a store made by an older version
                    default = "''" if kind == "TEXT" else "0"
                    db.execute(
                        f"ALTER TABLE portals ADD COLUMN {column} {kind} NOT NULL DEFAULT {default}"
                    )
            self._db = db
        return self._db

    async def get(self, member_id: str) -> PortalRecord | None:
        row = await self._run(self._get, member_id)
        return PortalRecord(*row) if row else None

    def _get(self, member_id: str) -> tuple[Any, ...] | None:
        row = (
            self._conn()
            .execute(f"SELECT {_COLUMNS} FROM portals WHERE member_id = ?", (member_id,))  # noqa: S608
            .fetchone()
        )
        return tuple(row) if row else None

    async def remember(self, record: PortalRecord, replacing: str | None = None) -> bool:
        return bool(await self._run(self._remember, record, replacing))

    def _remember(self, r: PortalRecord, replacing: str | None) -> int:
        values = (r.domain, r.token, r.installed_at, r.access_token, r.access_expires)
        if replacing is None:
            sql = (
                f"INSERT INTO portals ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "  # noqa: S608
                "ON CONFLICT(member_id) DO NOTHING"
            )
            return self._conn().execute(sql, (r.member_id, *values)).rowcount
        sql = (
            "UPDATE portals SET domain = ?, token = ?, installed_at = ?, access_token = ?, "
            "access_expires = ? WHERE member_id = ? AND token = ?"
        )
        return self._conn().execute(sql, (*values, r.member_id, replacing)).rowcount

    async def refresh_access(
        self, member_id: str, token: str, access_token: str, access_expires: int
    ) -> bool:
        sql = (
            "UPDATE portals SET access_token = ?, access_expires = ? "
            "WHERE member_id = ? AND token = ? AND access_expires < ?"
        )
        args = (access_token, access_expires, member_id, token, access_expires)
        return bool(await self._run(lambda: self._conn().execute(sql, args).rowcount))

    async def forget(self, member_id: str, token: str | None = None) -> bool:
        return bool(await self._run(self._forget, member_id, token))

    def _forget(self, member_id: str, token: str | None) -> int:
        if token is None:
            return (
                self._conn()
                .execute("DELETE FROM portals WHERE member_id = ?", (member_id,))
                .rowcount
            )
        sql = "DELETE FROM portals WHERE member_id = ? AND token = ?"
        return self._conn().execute(sql, (member_id, token)).rowcount

    async def all(self) -> list[PortalRecord]:
        rows = await self._run(self._all)
        return [PortalRecord(*row) for row in rows]

    def _all(self) -> list[tuple[Any, ...]]:
        sql = f"SELECT {_COLUMNS} FROM portals ORDER BY installed_at"  # noqa: S608
        return [tuple(r) for r in self._conn().execute(sql)]

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close)
        self._thread.shutdown(wait=True)


class RedisTokenStore:
    """Shared by several ingress nodes. Needs `pip install b24queue[redis]`; persistence is
    Redis's (use AOF with `appendfsync always` or a replica for install durability)."""

    def __init__(self, url: str, prefix: str = "b24queue:portal:") -> None:
        self.url = url
        self.prefix = prefix
        self._client: Redis | None = None

    def _redis(self) -> Redis:
        if self._client is None:
            from redis.asyncio import Redis

            self._client = Redis.from_url(self.url)
        return self._client

    async def get(self, member_id: str) -> PortalRecord | None:
        raw = await self._redis().get(self.prefix + member_id)
        return _decode(raw) if raw else None

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

    async def refresh_access(
        self, member_id: str, token: str, access_token: str, access_expires: int
    ) -> bool:
        key = self.prefix + member_id
        done = await self._redis().eval(
            _REFRESH_ACCESS_LUA, 1, key, token, access_token, str(access_expires)
        )
        return bool(done)

    async def all(self) -> list[PortalRecord]:
        records = []
        async for key in self._redis().scan_iter(match=self.prefix + "*", count=500):
            raw = await self._redis().get(key)
            if raw:
                records.append(_decode(raw))
        return sorted(records, key=lambda r: r.installed_at)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


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
redis.call('SET', KEYS[1], cjson.encode(r))
return 1
"""
_DELETE_IF_SAME_LUA = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['token'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


_COLUMNS = "member_id, domain, token, installed_at, access_token, access_expires"


def _decode(raw: bytes | str) -> PortalRecord:
    data = json.loads(raw)
    return PortalRecord(
        data["member_id"],
        data["domain"],
        data["token"],
        data["installed_at"],
        str(data.get("access_token") or ""),
        int(data.get("access_expires") or 0),
    )


def open_store(spec: str) -> TokenStore:
    """`sqlite:PATH` or `redis://…` (from B24QUEUE_PORTAL_STORE)."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisTokenStore(spec)
    if spec.startswith("sqlite:"):
        return SqliteTokenStore(Path(spec.removeprefix("sqlite:")))
    raise ConfigError(
        f"B24QUEUE_PORTAL_STORE: {spec!r} is neither sqlite:PATH nor redis://HOST:PORT/DB"
    )
