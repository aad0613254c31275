"""The PostgreSQL transport: the database queue for apps that already run PostgreSQL, usable from
several ingress and worker hosts at once (`B24QUEUE_BROKER_URL=postgresql://user:pw@host/db`).

The guarantees every transport keeps (docs/transports/index.md):
- a 200 means the event's rows are committed (`synchronous_commit=on` for our sessions), one row
  per bound queue, or one in the unrouted queue, routed in SQL by the bindings as they are at that
  commit; concurrent requests share one statement and one commit (group commit);
- a worker claims up to `prefetch` rows with `FOR UPDATE SKIP LOCKED` under a lease; ack deletes,
  retry sets the row's `available_at`, dead-lettering moves it to `<queue>.dlq`, each one
  statement fenced by the delivery count; a crashed worker's rows come back when their lease
  (`handle_timeout_s` + a margin) ends, flagged redelivered;
- idle workers wake at once by LISTEN/NOTIFY (sent on commit), and poll every
  `B24QUEUE_POSTGRES_POLL_S` behind it;
- while PostgreSQL is unreachable the ingress spools, and forwards once it is back.
The tables live in their own schema (`B24QUEUE_POSTGRES_SCHEMA`, default `b24queue`), created or
checked at every start under an advisory lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from b24queue.consumer import EventConsumer
from b24queue.queues import DeclaredQueue, spec_for
from b24queue.settings import Settings
from b24queue.transports import connection_name, worker_connection_name
from b24queue.transports.kit.leased import ALIVE_S, LeasedWorkers
from b24queue.transports.kit.tables import TableDeadLetters, table_status
from b24queue.transports.postgres.db import (
    Listener,
    create_pool,
    ensure_schema,
    opened,
    translate,
)
from b24queue.transports.postgres.dlq import dead_letters
from b24queue.transports.postgres.publisher import PostgresPublisher
from b24queue.transports.postgres.queue import Queries
from b24queue.transports.postgres.runner import POOL_SIZE, workers
from b24queue.transports.status import Status

log = logging.getLogger(__name__)


class Postgres:
    name = "postgres"
    shares_by_portal = True  # fair claims (b24queue.transports.kit.fair)
    caps_per_portal = True
    orders_by_key = True  # ordered claims (b24queue.transports.kit.ordered)
    needs_spool = True  # the server can be away while the ingress runs

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._q = Queries(settings.postgres_schema)

    def publisher(self, connection_name: str) -> PostgresPublisher:
        return PostgresPublisher(self.settings, connection_name)

    async def open_workers(self, classes: Sequence[type[EventConsumer]]) -> LeasedWorkers:
        name = worker_connection_name(classes)
        pool = await create_pool(self.settings, name, POOL_SIZE)
        try:
            async with pool.acquire() as db:
                await ensure_schema(db, self.settings.postgres_schema)
        except BaseException as exc:
            await asyncio.gather(pool.close(), return_exceptions=True)
            if isinstance(exc, Exception):
                raise translate(exc, self.settings) from None
            raise
        listener = Listener(self.settings, name)
        listener.start()
        return workers(self.settings, pool, listener, name)

    async def declare(self, classes: Sequence[type[EventConsumer]]) -> list[DeclaredQueue]:
        settings = self.settings
        db = await opened(settings, connection_name("topology"))
        try:
            await self._q.declare_unrouted(db, settings.unrouted)
            for cls in classes:
                spec = spec_for(cls)
                for key in await self._q.declare(db, spec.name, spec.dlq, spec.bindings):
                    log.info("queue %s: removed binding %s", spec.name, key)
            counts = await self._q.depths(db)
        finally:
            await db.close()
        names = [settings.unrouted] + [
            n for cls in classes for n in (cls.queue, cls.queue + ".dlq")
        ]
        where = {"transport": "postgres", "schema": settings.postgres_schema}
        return [DeclaredQueue(n, counts.get(n, 0), 0, where) for n in names]

    async def status(self) -> Status:
        db = await opened(self.settings, connection_name("status"))
        try:
            view = await self._q.overview(db, ALIVE_S)
        finally:
            await db.close()
        return table_status(self.settings, view, "postgres")

    def dead_letters(self, queue: str) -> TableDeadLetters:
        return dead_letters(self.settings, queue)


def transport(settings: Settings) -> Postgres:
    return Postgres(settings)
