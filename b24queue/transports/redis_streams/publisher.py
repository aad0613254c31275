"""The ingress's sink on Redis: `publish` returns once the script holding the event has run (with
`appendfsync always`: once Redis has it in its append-only file); concurrent requests share one
script call."""

from __future__ import annotations

import asyncio
import logging

from b24queue.errors import BrokerUnavailableError
from b24queue.events.envelope import Envelope
from b24queue.settings import Settings
from b24queue.transports.kit.publisher import GroupCommitPublisher
from b24queue.transports.redis_streams.connection import CONNECTION_ERRORS, check_durable
from b24queue.transports.redis_streams.store import Store, opened

log = logging.getLogger(__name__)


class RedisPublisher(GroupCommitPublisher):
    server = "Redis"
    lost = CONNECTION_ERRORS

    def __init__(self, settings: Settings, name: str) -> None:
        super().__init__(settings, name)
        self._store: Store | None = None

    async def _disconnect(self) -> None:
        if self._store is not None:
            await asyncio.gather(self._store.client.aclose(), return_exceptions=True)

    async def _keep(self) -> None:
        """Check the server once (persistence), then watch the connection: `_ready` goes false
        on a failure and true again once a ping answers."""
        store = self._store = await self._until_up(self._checked)
        self._ready = True
        log.info(
            "publishing to %s prefix %s (appendfsync always)",
            self._settings.redacted_broker_url(),
            self._settings.redis_prefix,
        )
        while True:
            await asyncio.sleep(self._settings.reconnect_interval_s)
            if self._ready:
                continue
            try:
                await store.client.ping()
            except Exception as exc:
                log.debug("Redis still away: %r", exc)
                continue
            self._ready = True
            log.info("Redis answers again")

    async def _checked(self) -> Store:
        """A connection to a Redis that keeps events as b24queue needs, the unrouted queue
        declared; closed when not (each retry opens its own)."""
        store = await opened(self._settings, self._name)
        try:
            await check_durable(store.client, self._settings)
            await store.declare_unrouted()
        except BaseException:
            await asyncio.gather(store.client.aclose(), return_exceptions=True)
            raise
        return store

    def is_ready(self) -> bool:
        return self._store is not None and self._ready

    async def _write(self, envelopes: list[Envelope]) -> list[None]:
        assert self._store is not None
        try:
            dropped = await self._store.publish(envelopes, self.unrouted)
        except CONNECTION_ERRORS:
            self._lost()
            raise
        self.unrouted.dropped(*dropped)
        return [None] * len(envelopes)

    async def publish(self, envelope: Envelope) -> None:
        try:
            await self._committed(envelope, "answer")
        except BrokerUnavailableError:  # not connected, no answer in time, over maxmemory
            raise
        except CONNECTION_ERRORS as exc:
            raise BrokerUnavailableError(f"connection to Redis failed: {exc!r}") from None
        except Exception as exc:  # a read-only replica: try again later
            raise BrokerUnavailableError(f"Redis refused the write: {exc!r}") from None
