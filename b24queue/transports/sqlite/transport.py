"""The embedded SQLite transport: for a small app on one host, no server to run.

One database file (`B24QUEUE_BROKER_URL=sqlite:///path/queue.sqlite3`) shared by the ingress, the
workers and the CLI of that host (never over NFS: SQLite's locking needs a local disk). The
guarantees every transport keeps (docs/transports/index.md):
- a 200 means the event's rows are committed (WAL, fsync), one row per bound queue, or one in the
  unrouted queue, in one transaction (group-committed with whatever else arrived meanwhile);
- a worker leases up to `prefetch` rows, in due order; ack deletes, retry sets the row's
  `available_at`, dead-lettering moves it to `<queue>.dlq`: each one statement, so a crash never
  leaves two copies or none; a crashed worker's rows come back when their lease
  (`handle_timeout_s` + a margin) ends, flagged redelivered;
- retry delays are served by the declared levels, as on RabbitMQ (one rule everywhere);
- a stopping worker hands back what it could not finish at once.
Idle workers wake at once for events published in their own process, else within
`B24QUEUE_SQLITE_POLL_S` (one watch per process reads for all its runners:
b24queue.transports.sqlite.runner).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from b24queue.consumer import EventConsumer
from b24queue.queues import DeclaredQueue, spec_for
from b24queue.settings import Settings
from b24queue.transports.kit.leased import ALIVE_S, LeasedWorkers
from b24queue.transports.kit.tables import TableDeadLetters, table_status
from b24queue.transports.sqlite import queue as q
from b24queue.transports.sqlite.db import Database
from b24queue.transports.sqlite.dlq import dead_letters
from b24queue.transports.sqlite.publisher import SqlitePublisher
from b24queue.transports.sqlite.runner import workers
from b24queue.transports.status import Status

log = logging.getLogger(__name__)


class Sqlite:
    name = "sqlite"
    shares_by_portal = True  # fair claims (b24queue.transports.kit.fair)
    caps_per_portal = True
    orders_by_key = True  # ordered claims (b24queue.transports.kit.ordered)
    needs_spool = False  # the queue is on the ingress's own disk

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = Path(settings.sqlite_path)

    def publisher(self, connection_name: str) -> SqlitePublisher:
        return SqlitePublisher(self.settings, self.path)

    async def open_workers(self, classes: Sequence[type[EventConsumer]]) -> LeasedWorkers:
        db = Database(self.path)
        await db.__aenter__()
        return workers(self.settings, db)

    async def declare(self, classes: Sequence[type[EventConsumer]]) -> list[DeclaredQueue]:
        unrouted = self.settings.unrouted
        async with Database(self.path) as db:
            await db.write(lambda conn: q.declare_unrouted(conn, unrouted))
            for cls in classes:
                spec = spec_for(cls)
                declare = functools.partial(
                    q.declare, queue=spec.name, dlq=spec.dlq, patterns=spec.bindings
                )
                _, removed = await db.write(declare)
                for key in removed:
                    log.info("queue %s: removed binding %s", spec.name, key)
            names = [unrouted] + [n for cls in classes for n in (cls.queue, cls.queue + ".dlq")]
            counts = await db.read(lambda conn: q.depths(conn))
        return [DeclaredQueue(n, counts.get(n, 0), 0, {"transport": "sqlite"}) for n in names]

    async def status(self) -> Status:
        async with Database(self.path) as db:
            view = await db.read(lambda conn: q.overview(conn, time.time() - ALIVE_S))
        return table_status(self.settings, view, "sqlite")

    def dead_letters(self, queue: str) -> TableDeadLetters:
        return dead_letters(self.settings, queue)


def transport(settings: Settings) -> Sqlite:
    return Sqlite(settings)
