"""`b24queue dlq` on the embedded queue: the `Shelf` of `b24queue.transports.kit.tables` on the
queue database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from b24queue.settings import Settings
from b24queue.transports.kit.leased import Row
from b24queue.transports.kit.tables import TableDeadLetters
from b24queue.transports.sqlite import queue as q
from b24queue.transports.sqlite.db import Database, notify


class SqliteShelf:
    def __init__(self, db: Database, unrouted: str) -> None:
        self._db = db
        self._unrouted = unrouted

    async def exists(self, queue: str) -> bool:
        return await self._db.read(lambda db: q.exists(db, queue))

    async def count(self, queue: str) -> int:
        return await self._db.read(lambda db: q.depth(db, queue))

    async def first(self, queue: str, limit: int, after: Any) -> list[Row]:
        start = -1 if after is None else int(after)
        return await self._db.read(lambda db: q.first(db, queue, limit, start))

    async def replay(
        self, row: Row, headers: dict[str, Any], back_to: str | None, source: str
    ) -> bool:
        unrouted = self._unrouted
        moved = await self._db.write(
            lambda db: q.replay(db, row, headers, back_to, unrouted, source)
        )
        if moved:
            notify(self._db.path)
        return moved

    async def purge(self, queue: str, count: int) -> int:
        return int(await self._db.write(lambda db: q.purge(db, queue, count)))


def dead_letters(settings: Settings, queue: str) -> TableDeadLetters:
    db = Database(Path(settings.sqlite_path))

    async def opened() -> SqliteShelf:
        await db.__aenter__()
        return SqliteShelf(db, settings.unrouted)

    return TableDeadLetters(settings, queue, opened, db.__aexit__)
