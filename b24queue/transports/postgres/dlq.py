"""`b24queue dlq` on PostgreSQL: the `Shelf` of `b24queue.transports.kit.tables` on one
connection for the command's run."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from b24queue.settings import Settings
from b24queue.transports import connection_name
from b24queue.transports.kit.leased import Row
from b24queue.transports.kit.tables import TableDeadLetters
from b24queue.transports.postgres.db import opened
from b24queue.transports.postgres.queue import Queries


class PostgresShelf:
    def __init__(self, settings: Settings, connection: asyncpg.Connection) -> None:
        self._db = connection
        self._unrouted = settings.unrouted
        self._q = Queries(settings.postgres_schema)

    async def exists(self, queue: str) -> bool:
        return await self._q.exists(self._db, queue)

    async def count(self, queue: str) -> int:
        return await self._q.count(self._db, queue)

    async def first(self, queue: str, limit: int, after: Any) -> list[Row]:
        return await self._q.first(self._db, queue, limit, -1 if after is None else int(after))

    async def replay(
        self, row: Row, headers: dict[str, Any], back_to: str | None, source: str
    ) -> bool:
        return await self._q.replay(self._db, row, headers, back_to, self._unrouted, source)

    async def purge(self, queue: str, count: int) -> int:
        return await self._q.purge(self._db, queue, count)


def dead_letters(settings: Settings, queue: str) -> TableDeadLetters:
    held: list[asyncpg.Connection] = []

    async def open_shelf() -> PostgresShelf:
        held.append(await opened(settings, connection_name("dlq", queue)))
        return PostgresShelf(settings, held[0])

    async def close_shelf() -> None:
        while held:
            await asyncio.gather(held.pop().close(), return_exceptions=True)

    return TableDeadLetters(settings, queue, open_shelf, close_shelf)
