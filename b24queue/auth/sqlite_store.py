"""The portal store in one SQLite file (WAL, fsync at every commit, 0600)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from b24queue.auth.record import Grant, PortalRecord
from b24queue.secrets.stores import SqliteFile, open_sqlite

# Columns added after the first version: a store made by an older version gets them.
_ADDED = (
    ("access_token", "TEXT", "''"),
    ("access_expires", "INTEGER", "0"),
    ("refresh_token", "TEXT", "''"),
    ("client_endpoint", "TEXT", "''"),
)


class SqliteTokenStore(SqliteFile):
    """One file for one host: its ingress and workers (WAL, fsync at every commit). Private:
    every portal's token is in here."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "b24queue-portals")

    def _open(self) -> sqlite3.Connection:
        return open_sqlite(self.path, _create)

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
        values = (
            r.domain,
            r.token,
            r.installed_at,
            r.access_token,
            r.access_expires,
            r.refresh_token,
            r.client_endpoint,
        )
        if replacing is None:
            sql = (
                f"INSERT INTO portals ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "  # noqa: S608
                "ON CONFLICT(member_id) DO NOTHING"
            )
            return self._conn().execute(sql, (r.member_id, *values)).rowcount
        sql = (
            "UPDATE portals SET domain = ?, token = ?, installed_at = ?, access_token = ?, "
            "access_expires = ?, refresh_token = ?, client_endpoint = ? "
            "WHERE member_id = ? AND token = ?"
        )
        return self._conn().execute(sql, (*values, r.member_id, replacing)).rowcount

    async def refresh_access(self, member_id: str, token: str, grant: Grant) -> bool:
        sql = (
            "UPDATE portals SET access_token = ?, access_expires = ?, "
            "refresh_token = CASE WHEN ? = '' THEN refresh_token ELSE ? END "
            "WHERE member_id = ? AND token = ? AND access_expires < ?"
        )
        access, expires, refresh = grant.access_token, grant.access_expires, grant.refresh_token
        args = (access, expires, refresh, refresh, member_id, token, expires)
        return bool(await self._run(lambda: self._conn().execute(sql, args).rowcount))

    async def refreshed(self, member_id: str, old_refresh: str, grant: Grant) -> bool:
        sql = (
            "UPDATE portals SET access_token = ?, refresh_token = ?, access_expires = ? "
            "WHERE member_id = ? AND refresh_token = ? AND refresh_token != ''"
        )
        fresh = (grant.access_token, grant.refresh_token, grant.access_expires)
        args = (*fresh, member_id, old_refresh)
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


def _create(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS portals (member_id TEXT PRIMARY KEY, "
        "domain TEXT NOT NULL, token TEXT NOT NULL, installed_at TEXT NOT NULL)"
    )
    have = {row[1] for row in db.execute("PRAGMA table_info(portals)")}
    for column, kind, default in _ADDED:
        if column not in have:  # a store made by an older version
            db.execute(f"ALTER TABLE portals ADD COLUMN {column} {kind} NOT NULL DEFAULT {default}")


_COLUMNS = (
    "member_id, domain, token, installed_at, access_token, access_expires, refresh_token, "
    "client_endpoint"
)
