"""Portal buckets, held methods and refresh leases in the portal store's SQLite file (tables of
their own).

Each reservation is one `BEGIN IMMEDIATE` transaction, so processes on this host take turns.
The state is not worth an fsync (after a crash a bucket starts empty, a lease runs out): its
connection commits with synchronous=NORMAL, unlike the tokens beside it.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from b24queue.portal.limits import MAX_HELD_METHODS, Limit, method_key, reserve
from b24queue.secrets.stores import SqliteFile, open_sqlite


class SqliteState(SqliteFile):
    def __init__(self, path: Path, clock: Any = time.time) -> None:
        super().__init__(path, "b24queue-limits")
        self._clock = clock

    def _open(self) -> sqlite3.Connection:
        return open_sqlite(self.path, _create, synchronous="NORMAL", timeout_s=10)

    async def reserve(self, key: str, limit: Limit) -> float | None:
        wait: float | None = await self._run(self._reserve, key, limit)
        return wait

    def _reserve(self, key: str, limit: Limit) -> float | None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT level, stamp FROM portal_buckets WHERE key = ?", (key,)
            ).fetchone()
            now = self._clock()
            level, stamp = row if row else (0.0, now)
            done = reserve(level, stamp, now, limit)
            if done is not None:
                db.execute(
                    "INSERT INTO portal_buckets (key, level, stamp) VALUES (?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET level = excluded.level, stamp = excluded.stamp",
                    (key, done[0], now),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return None if done is None else done[1]

    async def hold(self, key: str, method: str, for_s: float) -> None:
        await self._run(self._hold, key, method_key(method), for_s)

    def _hold(self, key: str, method: str, for_s: float) -> None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            now = self._clock()
            db.execute("DELETE FROM portal_held WHERE key = ? AND until <= ?", (key, now))
            db.execute(
                "INSERT INTO portal_held (key, method, until) VALUES (?, ?, ?) "
                "ON CONFLICT(key, method) DO UPDATE SET until = max(until, excluded.until)",
                (key, method, now + for_s),
            )
            (count,) = db.execute(
                "SELECT count(*) FROM portal_held WHERE key = ?", (key,)
            ).fetchone()
            if count > MAX_HELD_METHODS:  # the holds that end first go
                db.execute(
                    "DELETE FROM portal_held WHERE key = ? AND method IN (SELECT method FROM "
                    "portal_held WHERE key = ? AND method != ? ORDER BY until LIMIT ?)",
                    (key, key, method, count - MAX_HELD_METHODS),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def held(self, key: str, method: str) -> float:
        sql = "SELECT until FROM portal_held WHERE key = ? AND method = ?"

        def held() -> float:
            row = self._conn().execute(sql, (key, method_key(method))).fetchone()
            return 0.0 if row is None else max(0.0, float(row[0]) - self._clock())

        wait: float = await self._run(held)
        return wait

    async def lease(self, key: str, owner: str, ttl_s: float) -> bool:
        return bool(await self._run(self._lease, key, owner, ttl_s))

    def _lease(self, key: str, owner: str, ttl_s: float) -> int:
        now = self._clock()
        sql = (
            "INSERT INTO portal_leases (key, owner, until) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET owner = excluded.owner, until = excluded.until "
            "WHERE portal_leases.until < ?"
        )
        return self._conn().execute(sql, (key, owner, now + ttl_s, now)).rowcount

    async def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        sql = "UPDATE portal_leases SET until = ? WHERE key = ? AND owner = ? AND until >= ?"

        def renew() -> int:
            now = self._clock()
            return self._conn().execute(sql, (now + ttl_s, key, owner, now)).rowcount

        return bool(await self._run(renew))

    async def release(self, key: str, owner: str) -> None:
        sql = "DELETE FROM portal_leases WHERE key = ? AND owner = ?"
        await self._run(lambda: self._conn().execute(sql, (key, owner)))


def _create(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS portal_buckets (key TEXT PRIMARY KEY, "
        "level REAL NOT NULL, stamp REAL NOT NULL)"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS portal_held (key TEXT NOT NULL, method TEXT NOT NULL, "
        "until REAL NOT NULL, PRIMARY KEY (key, method))"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS portal_leases (key TEXT PRIMARY KEY, "
        "owner TEXT NOT NULL, until REAL NOT NULL)"
    )
