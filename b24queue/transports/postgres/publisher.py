"""The ingress's sink on PostgreSQL: one connection, made and remade in the background; `publish`
returns once the event's rows are committed (group commit: concurrent requests share one
statement and one commit)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from b24queue.errors import BrokerUnavailableError, PublishError
from b24queue.events.envelope import Envelope
from b24queue.settings import Settings
from b24queue.transports.kit.publisher import GroupCommitPublisher
from b24queue.transports.postgres.db import CONNECTION_ERRORS, broken, opened
from b24queue.transports.postgres.queue import Queries

log = logging.getLogger(__name__)


class PostgresPublisher(GroupCommitPublisher):
    server = "PostgreSQL"
    lost = CONNECTION_ERRORS

    def __init__(self, settings: Settings, name: str) -> None:
        super().__init__(settings, name)
        self._q = Queries(settings.postgres_schema)
        self._connection: asyncpg.Connection | None = None
        self._lost_event = asyncio.Event()

    async def _disconnect(self) -> None:
        if self._connection is not None:
            await asyncio.gather(
                asyncio.wait_for(self._connection.close(), 5), return_exceptions=True
            )

    async def _keep(self) -> None:
        """Connect (creating the schema), and again whenever the connection is lost."""
        while True:
            connection = await self._until_up(self._connect)
            await self._use(connection)
            self.breaks += 1
            log.warning("the connection to PostgreSQL was lost; reconnecting")
            await asyncio.sleep(self._settings.reconnect_interval_s)

    async def _connect(self) -> asyncpg.Connection:
        connection = await opened(self._settings, self._name)
        await self._q.declare_unrouted(connection, self._settings.unrouted)
        return connection

    async def _use(self, connection: asyncpg.Connection) -> None:
        """Publish on `connection` until it is lost (or `_write` finds it broken)."""
        # One event per connection: a late notice from an old one cannot drop the new one.
        lost = self._lost_event = asyncio.Event()
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

    def is_ready(self) -> bool:
        return self._connection is not None and not self._connection.is_closed()

    async def _write(self, envelopes: list[Envelope]) -> list[None]:
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
        return [None] * len(envelopes)

    def _drop_if_broken(self, connection: asyncpg.Connection, exc: BaseException) -> None:
        if broken(exc):  # never use it again: connect anew
            self._connection = None
            connection.terminate()
            self._lost_event.set()

    async def publish(self, envelope: Envelope) -> None:
        try:
            await self._committed(envelope, "commit")
        except BrokerUnavailableError:
            raise
        except asyncpg.exceptions.DataError as exc:  # this event can never be stored
            raise PublishError(f"PostgreSQL refused the event: {exc}", permanent=True) from None
        except CONNECTION_ERRORS as exc:
            raise BrokerUnavailableError(f"connection to PostgreSQL failed: {exc!r}") from None
        except Exception as exc:  # a full disk, a read-only server: try again later
            raise BrokerUnavailableError(f"PostgreSQL refused the write: {exc!r}") from None
