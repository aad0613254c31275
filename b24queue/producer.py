"""`Producer`: the app's own messages published from application code (a web view, a script, a
management command), and the worker's publisher for what handlers publish (b24queue.publishing
says what a message is)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Self

from b24queue.auth.store import TokenStore, open_store
from b24queue.errors import BrokerUnavailableError, ConfigError
from b24queue.events.envelope import Envelope, EventSink, new_message_id, token_digest
from b24queue.events.event import Event
from b24queue.publishing import (
    Origin,
    PublishInputError,
    app_envelope,
    check_delay,
    check_key,
    check_name,
    derived_id,
)
from b24queue.settings import Settings
from b24queue.transports import Publisher, Transport, connection_name, transport_for


class LazyPublisher:
    """A worker's publisher for its handlers' messages: connected at the first message (a worker
    whose handlers publish nothing opens nothing), waiting up to `publish_timeout_s` for the
    connection before a publish fails."""

    def __init__(self, transport: Transport, connection_name: str, wait_s: float) -> None:
        self._transport = transport
        self._name = connection_name
        self._wait_s = wait_s
        self._publisher: Publisher | None = None
        self._lock = asyncio.Lock()

    async def publish(self, envelope: Envelope) -> None:
        publisher = self._publisher or await self._open()
        await when_ready(publisher, self._wait_s)
        await publisher.publish(envelope)

    def is_ready(self) -> bool:
        return self._publisher is not None and self._publisher.is_ready()

    async def _open(self) -> Publisher:
        async with self._lock:
            if self._publisher is None:
                publisher = self._transport.publisher(self._name)
                self._publisher = await publisher.__aenter__()
            return self._publisher

    async def close(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.__aexit__(None, None, None)


async def when_ready(publisher: EventSink, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while not publisher.is_ready():
        if time.monotonic() >= deadline:
            raise BrokerUnavailableError(f"the queue was not reachable within {wait_s:g}s")
        await asyncio.sleep(0.05)


class Producer:
    """Publish from application code (a web view, a script), with the ingress's confirmed,
    durable publish:

        async with Producer(settings) as producer:
            await producer.publish("APP.DEAL.RECHECK", {"id": 42}, portal=event, key="deal-42")

    `portal`: the `Event` whose portal the message is of (its domain, member_id and the digest
    of its application token, so the consumer's `self.portal(event)` can call it), or the
    member_id of an installed portal (looked up in B24QUEUE_PORTAL_STORE), or None (no portal).
    `key`: the same (name, portal, key) is always the same message id (see the module).
    Returns the message id. No spool: while the queue is away `publish` raises
    `BrokerUnavailableError` after `publish_timeout_s` (docs/publishing.md)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._publisher: LazyPublisher | None = None
        self._store: TokenStore | None = None

    async def __aenter__(self) -> Self:
        transport = transport_for(self.settings)
        self._publisher = LazyPublisher(
            transport, connection_name("producer"), self.settings.publish_timeout_s
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        publisher, self._publisher = self._publisher, None
        store, self._store = self._store, None
        try:
            if publisher is not None:
                await publisher.close()
        finally:
            if store is not None:
                await store.close()

    async def publish(
        self,
        name: str,
        data: Any = None,
        *,
        portal: Event | str | None = None,
        key: str | None = None,
        delay_s: float = 0,
    ) -> str:
        if self._publisher is None:
            raise ConfigError("Producer.publish: use `async with Producer(settings)` first")
        checked = check_name(name)
        key_ = check_key(key)
        check_delay(delay_s)
        origin = await self._origin(portal)
        if key_ is None:
            message_id = new_message_id()
        else:
            message_id = derived_id("producer", checked, origin.member_id or "", key_)
        envelope = app_envelope(checked, data, origin, message_id)
        await self._publisher.publish(envelope)
        return message_id

    async def _origin(self, portal: Event | str | None) -> Origin:
        if portal is None:
            return Origin()
        if isinstance(portal, Event):
            return Origin.of_event(portal)
        if not isinstance(portal, str) or not 1 <= len(portal) <= 64:
            raise PublishInputError("portal: an Event, a member_id or None", "portal")
        if self._store is None:  # opened at the first member_id, kept till the producer closes
            self._store = open_store(self.settings.portal_store)
        record = await self._store.get(portal)
        if record is None:
            raise PublishInputError(
                f"portal: no installed portal with member_id {portal!r} in B24QUEUE_PORTAL_STORE",
                "portal",
            )
        return Origin(record.domain, record.member_id, token_digest(record.token))
