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

from b24queue.errors import ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis


@dataclass(frozen=True, slots=True)
class PortalRecord:
    member_id: str
    domain: str
    token: str = field(repr=False)
    installed_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())


class TokenStore(Protocol):
    async def get(self, member_id: str) -> PortalRecord | None: ...

    async def remember(self, record: PortalRecord) -> None:
        """Durable before it returns."""

    async def forget(self, member_id: str) -> bool: ...

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
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS portals (member_id TEXT PRIMARY KEY, "
                "domain TEXT NOT NULL, token TEXT NOT NULL, installed_at TEXT NOT NULL)"
            )
            self._db = db
        return self._db

    async def get(self, member_id: str) -> PortalRecord | None:
        row = await self._run(self._get, member_id)
        return PortalRecord(*row) if row else None

    def _get(self, member_id: str) -> tuple[str, str, str, str] | None:
        row = (
            self._conn()
            .execute(
                "SELECT member_id, domain, token, installed_at FROM portals WHERE member_id = ?",
                (member_id,),
            )
            .fetchone()
        )
        return tuple(row) if row else None

    async def remember(self, record: PortalRecord) -> None:
        await self._run(self._remember, record)

    def _remember(self, r: PortalRecord) -> None:
        self._conn().execute(
            "INSERT INTO portals (member_id, domain, token, installed_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(member_id) DO UPDATE SET domain = excluded.domain, "
            "token = excluded.token, installed_at = excluded.installed_at",
            (r.member_id, r.domain, r.token, r.installed_at),
        )

    async def forget(self, member_id: str) -> bool:
        return bool(await self._run(self._forget, member_id))

    def _forget(self, member_id: str) -> int:
        return (
            self._conn().execute("DELETE FROM portals WHERE member_id = ?", (member_id,)).rowcount
        )

    async def all(self) -> list[PortalRecord]:
        rows = await self._run(self._all)
        return [PortalRecord(*row) for row in rows]

    def _all(self) -> list[tuple[str, str, str, str]]:
        return [
            tuple(r)
            for r in self._conn().execute(
                "SELECT member_id, domain, token, installed_at FROM portals ORDER BY installed_at"
            )
        ]

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

    async def remember(self, record: PortalRecord) -> None:
        value = json.dumps(
            {
                "member_id": record.member_id,
                "domain": record.domain,
                "token": record.token,
                "installed_at": record.installed_at,
            }
        )
        await self._redis().set(self.prefix + record.member_id, value)

    async def forget(self, member_id: str) -> bool:
        return bool(await self._redis().delete(self.prefix + member_id))

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


def _decode(raw: bytes | str) -> PortalRecord:
    data = json.loads(raw)
    return PortalRecord(data["member_id"], data["domain"], data["token"], data["installed_at"])


def open_store(spec: str) -> TokenStore:
    """`sqlite:PATH` or `redis://…` (from B24QUEUE_PORTAL_STORE)."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisTokenStore(spec)
    if spec.startswith("sqlite:"):
        return SqliteTokenStore(Path(spec.removeprefix("sqlite:")))
    raise ConfigError(
        f"B24QUEUE_PORTAL_STORE: {spec!r} is neither sqlite:PATH nor redis://HOST:PORT/DB"
    )
