"""The SQLite transport's worker side: the `Leases` of `b24queue.transports.kit.leased` on the queue
database (every write group-committed by `db.Database`).

Idle runners do not poll the database each: one watch per worker process does, every
`B24QUEUE_SQLITE_POLL_S`, and wakes only the runners whose queues have something to claim. It
reads `PRAGMA data_version` (changed when another process committed, such as an ingress
publishing) and only then which queues are due, in one statement for all of them; once a second
it reads that anyway (a retry whose delay ended, a lease that ran out, commit no one made). Events
published in this process wake its runners at once (`db.notify`). With 100 consumers an idle
worker polled 2,000 times a second, 16% of a core; the watch costs a small fraction of that."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from typing import Any

from b24queue import _constants as c
from b24queue.ordering import Ordering
from b24queue.queues import QueueSpec
from b24queue.settings import Settings
from b24queue.transports.kit.leased import HEARTBEAT_S, LeasedWorkers, Row
from b24queue.transports.sqlite import queue as q
from b24queue.transports.sqlite.db import Database, listen, notify

log = logging.getLogger(__name__)

FULL_CHECK_S = 1.0  # the watch reads which queues are due at least this often


class SqliteLeases:
    def __init__(self, settings: Settings, db: Database) -> None:
        self._db = db
        self.where = str(db.path)
        # A runner's own look, woken or not: the watch wakes it when its queue has work.
        self.poll_s = HEARTBEAT_S
        self._watch_s = settings.sqlite_poll_s
        self._queues: dict[str, Ordering | None] = {}  # the runners' queues, for the watch
        self._version: int | None = None  # the database's data_version at the watch's last read
        self._wakes: dict[str, asyncio.Event] = {}
        self._watch: asyncio.Task[None] | None = None

    async def declare(self, spec: QueueSpec) -> list[str]:
        _, removed = await self._db.write(
            lambda db: q.declare(db, spec.name, spec.dlq, spec.bindings)
        )
        self._queues[spec.name] = spec.ordering
        return removed

    def wake(self, queue: str) -> asyncio.Event:
        event = self._wakes[queue] = listen(self._db.path)
        if self._watch is None:
            self._watch = asyncio.create_task(self._watching(), name="b24queue-sqlite-watch")
        return event

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)

    def _due(self, db: sqlite3.Connection, full: bool) -> list[str]:
        """The watch's read: which queues are due, if another process committed since its last
        read (or `full`)."""
        (now,) = db.execute("PRAGMA data_version").fetchone()
        if not full and now == self._version:
            return []
        found = q.due_among(db, dict(self._queues))
        self._version = now  # only once read: a failed read looks again at the next poll
        return found

    async def _watching(self) -> None:
        full_at = 0.0
        while True:
            await asyncio.sleep(self._watch_s)
            full = time.monotonic() >= full_at
            if full:
                full_at = time.monotonic() + FULL_CHECK_S
            try:
                found = await self._db.read(functools.partial(self._due, full=full))
            except Exception as exc:  # a database locked or away: the runners' own look
                log.debug("the SQLite watch failed: %r", exc)
                continue
            for queue in found:
                with contextlib.suppress(KeyError):
                    self._wakes[queue].set()

    async def claim(self, spec: QueueSpec, owner: str, count: int, lease_s: float) -> list[Row]:
        # A read first: idle workers of several processes poll without taking the write lock.
        queue, fairness, ordering = spec.name, spec.fairness, spec.ordering
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
        ordering = self._queues.get(queue)
        if ordering is not None and ordering.on:
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
    leases = SqliteLeases(settings, db)
    return LeasedWorkers(leases, leases.stop, db.__aexit__)
