"""The PostgreSQL transport: the database queue for apps that already run PostgreSQL, usable from
several ingress and worker hosts at once (`B24QUEUE_BROKER_URL=postgresql://user:pw@host/db`).

The same guarantees as on RabbitMQ (`shared/TRANSPORTS.md`):
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
from types import TracebackType
from typing import Any

import asyncpg

from b24queue.consumer import EventConsumer
from b24queue.envelope import Envelope
from b24queue.errors import B24QueueError, BrokerUnavailableError, PublishError
from b24queue.layout import QueueState, spec_for
from b24queue.settings import Settings
from b24queue.status import Status
from b24queue.transports import connection_name, given_up
from b24queue.transports.batching import Batcher
from b24queue.transports.leased import ALIVE_S, Row
from b24queue.transports.postgres.db import (
    CONNECTION_ERRORS,
    Listener,
    broken,
    create_pool,
    ensure_schema,
    opened,
    translate,
)
from b24queue.transports.postgres.queue import Queries
from b24queue.transports.postgres.worker import POOL_SIZE, PostgresWorkers
from b24queue.transports.tables import TableDeadLetters, table_status
from b24queue.transports.unrouted import UnroutedCap

log = logging.getLogger(__name__)


class PostgresPublisher:
    """The ingress's sink: one connection, made and remade in the background; `publish` returns
    once the event's rows are committed."""

    def __init__(self, settings: Settings, name: str) -> None:
        self._settings = settings
        self._name = name
        self._q = Queries(settings.postgres_schema)
        self._connection: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._batches: Batcher[Envelope, int] = Batcher(
            self._write, "b24queue-pg-publish", CONNECTION_ERRORS
        )
        # Connections lost so far (the spool's forwarder tells a poison event by it).
        self.breaks = 0
        self.unrouted = UnroutedCap(settings)

    async def __aenter__(self) -> PostgresPublisher:
        self._batches.start()
        self._task = asyncio.create_task(self._keep(), name="b24queue-pg-publisher")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._batches.stop()
        if self._connection is not None:
            await asyncio.gather(
                asyncio.wait_for(self._connection.close(), 5), return_exceptions=True
            )

    async def _keep(self) -> None:
        """Connect (creating the schema), and again whenever the connection is lost. Only a
        configuration error (credentials, a newer schema) ends this: `failed` reports it."""
        while True:
            try:
                connection = await opened(self._settings, self._name)
                await self._q.declare_unrouted(connection, self._settings.unrouted)
            except B24QueueError as exc:
                if not isinstance(exc, BrokerUnavailableError):
                    raise
                log.warning("%s; retrying", exc)
                await asyncio.sleep(self._settings.reconnect_interval_s)
                continue
            except Exception as exc:  # anything else on the way in: the server is not ready
                log.warning("PostgreSQL not ready (%r); retrying", exc)
                await asyncio.sleep(self._settings.reconnect_interval_s)
                continue
            await self._use(connection)
            self.breaks += 1
            log.warning("the connection to PostgreSQL was lost; reconnecting")
            await asyncio.sleep(self._settings.reconnect_interval_s)

    async def _use(self, connection: asyncpg.Connection) -> None:
        """Publish on `connection` until it is lost (or `_write` finds it broken)."""
        # One event per connection: a late notice from an old one cannot drop the new one.
        lost = self._lost = asyncio.Event()
        connection.add_termination_listener(lambda _: lost.set())
        self._connection = connection
        log.info(
            "publishing to %s schema %s (synchronous commit)",
            self._settings.redacted_broker_url(),
            self._settings.postgres_schema,
        )
        try:
            await lost.wait()
        finally:
            self._connection = None
            connection.terminate()

    async def failed(self) -> BaseException:
        return await given_up(self._task)

    def is_ready(self) -> bool:
        return self._connection is not None and not self._connection.is_closed()

    async def _write(self, envelopes: list[Envelope]) -> list[int]:
        connection = self._connection
        if connection is None or connection.is_closed():
            raise ConnectionError("not connected to PostgreSQL")
        cap = self.unrouted
        try:
            held = await self._q.publish(connection, envelopes, cap.queue)
        except BaseException as exc:
            self._drop_if_broken(connection, exc)
            raise
        if held and cap.far_over(*held):
            # The events are committed: whatever happens now, they are answered 200.
            try:
                cap.dropped(*await self._q.drop_oldest(connection, cap))
            except Exception as exc:  # the next publish past the cap tries again
                self._drop_if_broken(connection, exc)
                log.warning("could not drop the oldest events of the unrouted queue: %r", exc)
        return [1] * len(envelopes)

    def _drop_if_broken(self, connection: asyncpg.Connection, exc: BaseException) -> None:
        if broken(exc):  # never use it again: connect anew
            self._connection = None
            connection.terminate()
            self._lost.set()

    async def publish(self, envelope: Envelope) -> None:
        if not self.is_ready():
            raise BrokerUnavailableError("not connected to PostgreSQL")
        timeout_s = self._settings.publish_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await self._batches.submit(envelope)
        except TimeoutError:
            # The commit may still happen: the event is then there and was answered 503 (at
            # least once; Bitrix24 does not resend it, nothing is lost).
            raise BrokerUnavailableError(
                f"PostgreSQL did not commit within {timeout_s:g}s"
            ) from None
        except asyncpg.exceptions.DataError as exc:  # this event can never be stored
            raise PublishError(f"PostgreSQL refused the event: {exc}", permanent=True) from None
        except CONNECTION_ERRORS as exc:
            raise BrokerUnavailableError(f"connection to PostgreSQL failed: {exc!r}") from None
        except Exception as exc:  # a full disk, a read-only server: try again later
            raise BrokerUnavailableError(f"PostgreSQL refused the write: {exc!r}") from None


class PostgresShelf:
    """`b24queue dlq` on PostgreSQL: one connection for the command's run."""

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


class Postgres:
    name = "postgres"
    needs_spool = True  # the server can be away while the ingress runs

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._q = Queries(settings.postgres_schema)

    def publisher(self, connection_name: str) -> PostgresPublisher:
        return PostgresPublisher(self.settings, connection_name)

    async def open_workers(self, classes: Sequence[type[EventConsumer]]) -> PostgresWorkers:
        name = connection_name("worker", ",".join(cls.queue for cls in classes))
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
        return PostgresWorkers(self.settings, pool, listener)

    async def declare(self, classes: Sequence[type[EventConsumer]]) -> list[QueueState]:
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
        return [QueueState(n, counts.get(n, 0), 0, where) for n in names]

    async def status(self) -> Status:
        db = await opened(self.settings, connection_name("status"))
        try:
            view = await self._q.overview(db, ALIVE_S)
        finally:
            await db.close()
        return table_status(self.settings, view, "postgres")

    def dead_letters(self, queue: str) -> TableDeadLetters:
        held: list[asyncpg.Connection] = []

        async def open_shelf() -> PostgresShelf:
            held.append(await opened(self.settings, connection_name("dlq", queue)))
            return PostgresShelf(self.settings, held[0])

        async def close_shelf() -> None:
            while held:
                await asyncio.gather(held.pop().close(), return_exceptions=True)

        return TableDeadLetters(self.settings, queue, open_shelf, close_shelf)


def transport(settings: Settings) -> Postgres:
    return Postgres(settings)
