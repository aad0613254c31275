"""The SQLite transport's worker side: the `Leases` of `b24queue.transports.kit.leased` on the queue
database (every write group-committed by `db.Database`)."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from b24queue import _constants as c
from b24queue.queues import QueueSpec
from b24queue.settings import Settings
from b24queue.transports.kit.leased import LeasedWorkers, Row
from b24queue.transports.sqlite import queue as q
from b24queue.transports.sqlite.db import Database, listen, notify


class SqliteLeases:
    def __init__(self, settings: Settings, db: Database) -> None:
        self._db = db
        self.where = str(db.path)
        self.poll_s = settings.sqlite_poll_s
        self._ordered: set[str] = set()  # queues with an order key (`_settled` wakes them)

    async def declare(self, spec: QueueSpec) -> list[str]:
        _, removed = await self._db.write(
            lambda db: q.declare(db, spec.name, spec.dlq, spec.bindings)
        )
        return removed

    def wake(self, queue: str) -> asyncio.Event:
        return listen(self._db.path)

    async def claim(self, spec: QueueSpec, owner: str, count: int, lease_s: float) -> list[Row]:
        # A read first: idle workers of several processes poll without taking the write lock.
        queue, fairness, ordering = spec.name, spec.fairness, spec.ordering
        if ordering.on:
            self._ordered.add(queue)
        if not await self._db.read(lambda db: q.due(db, queue, ordering)):
            return []
        return await self._db.write(
            lambda db: q.claim(db, queue, owner, count, lease_s, fairness, ordering)
        )

    async def ack(self, row: Row, owner: str, queue: str) -> bool:
        done = await self._db.write(lambda db: q.ack(db, row, owner))
        self._settled(queue)
        return done

    async def move(
        self, row: Row, owner: str, *, queue: str, headers: dict[str, Any], delay_s: float
    ) -> bool:
        source = queue.removesuffix(c.DLQ_SUFFIX)
        moved = await self._db.write(
            lambda db: q.move(db, row, owner, queue=queue, headers=headers, delay_s=delay_s)
        )
        self._settled(source)
        return moved

    def _settled(self, queue: str) -> None:
        """An ordered queue's event settled: its group's next one may be due now (this process's
        runners look at once; other processes' at their poll)."""
        if queue in self._ordered:
            notify(self._db.path)

    async def beat(self, owner: str, queue: str, name: str, ids: list[int], lease_s: float) -> None:
        def beat(db: sqlite3.Connection) -> None:
            q.heartbeat(db, owner, queue, name)
            q.renew(db, owner, ids, lease_s)

        await self._db.write(beat)

    async def release(self, owner: str, queue: str) -> None:
        await self._db.write(lambda db: q.release(db, owner))

    async def leave(self, owner: str, queue: str) -> None:
        await self._db.write(lambda db: q.leave(db, owner))


def workers(settings: Settings, db: Database) -> LeasedWorkers:
    """A worker process's session: its runners share this process's queue database."""
    return LeasedWorkers(SqliteLeases(settings, db), db.__aexit__)
