"""Portal buckets and refresh leases in the portal store's SQLite file (tables of their own).

Each reservation is one `BEGIN IMMEDIATE` transaction, so processes on this host take turns.
The state is not worth an fsync (after a crash a bucket starts empty, a lease runs out): its
connection commits with synchronous=NORMAL, unlike the tokens beside it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from b24queue.portal.limits import Limit, reserve
from b24queue.secrets.files import private_file


class SqliteState:
    def __init__(self, path: Path, clock: Any = time.time) -> None:
        self.path = path
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="b24queue-limits")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            private_file(self.path)
            db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS portal_buckets (key TEXT PRIMARY KEY, "
                "level REAL NOT NULL, stamp REAL NOT NULL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS portal_leases (key TEXT PRIMARY KEY, "
                "owner TEXT NOT NULL, until REAL NOT NULL)"
            )
            self._db = db
        return self._db

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

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close)
        self._thread.shutdown(wait=True)
