"""`Producer`: the app's own messages published from application code (a web view, a script, a
management command), with the ingress's confirmed publish and, where it has one, a spool of its
own (b24queue.publishing says what a message is)."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Self

from b24queue.auth.store import TokenStore, open_store
from b24queue.errors import ConfigError
from b24queue.events.envelope import EventSink, new_message_id, token_digest
from b24queue.events.event import Event
from b24queue.ingress.fallback import SpoolingSink
from b24queue.ingress.spool import Spool
from b24queue.publishing import (
    LazyPublisher,
    Origin,
    PublishInputError,
    app_envelope,
    check_delay,
    check_key,
    check_name,
    derived_id,
)
from b24queue.settings import Settings
from b24queue.transports import connection_name, transport_for

log = logging.getLogger(__name__)


SPOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def producer_spool_path(settings: Settings, name: str) -> Path:
    """The spool of the producer named `name`, beside the ingress's (not one of its slots)."""
    path = Path(settings.spool_path)
    return path.with_name(f"{path.stem}.producer-{name}{path.suffix}")


class Producer:
    """Publish from application code (a web view, a script), with the ingress's confirmed,
    durable publish:

        async with Producer(settings) as producer:
            await producer.publish("APP.DEAL.RECHECK", {"id": 42}, portal=event, key="deal-42")

    `portal`: the `Event` whose portal the message is of (its domain, member_id and the digest
    of its application token, so the consumer's `self.portal(event)` can call it), or the
    member_id of an installed portal (looked up in B24QUEUE_PORTAL_STORE), or None (no portal).
    `key`: the same (name, portal, key) is always the same message id (see the module).
    Returns the message id.

    `spool`: a name for this producer's own spool (letters, digits, `-`, `_`; one per process,
    kept across its restarts: `web-1`), where the ingress has one (a transport whose server can
    be away, and B24QUEUE_SPOOL_ENABLED): while the queue is away a message is kept in
    `<B24QUEUE_SPOOL_PATH's stem>.producer-<spool>.sqlite3` (fsync'd) and forwarded once the
    queue is back, by this producer or the next one opened with that name. Without it `publish`
    raises `BrokerUnavailableError` after `publish_timeout_s` (docs/publishing.md)."""

    def __init__(self, settings: Settings, *, spool: str | None = None) -> None:
        if spool is not None and (not isinstance(spool, str) or not SPOOL_NAME.fullmatch(spool)):
            raise PublishInputError(
                "spool: a name of 1 to 64 letters, digits, '-' or '_' (e.g. 'web-1')", "spool"
            )
        self.settings = settings
        self.spool_name = spool
        self._sink: EventSink | None = None
        self._lazy: LazyPublisher | None = None
        self._stack = contextlib.AsyncExitStack()
        self._store: TokenStore | None = None

    async def __aenter__(self) -> Self:
        transport = transport_for(self.settings)
        name = connection_name("producer", self.spool_name or "")
        if self.spool_name is not None and transport.needs_spool and self.settings.spool_enabled:
            async with contextlib.AsyncExitStack() as stack:
                publisher = await stack.enter_async_context(transport.publisher(name))
                path = producer_spool_path(self.settings, self.spool_name)
                spool = await stack.enter_async_context(Spool(path, self.settings.spool_max_events))
                self._sink = await stack.enter_async_context(
                    SpoolingSink(
                        publisher,
                        spool,
                        bypass_s=self.settings.spool_bypass_s,
                        retry_interval_s=self.settings.reconnect_interval_s,
                    )
                )
                self._stack = stack.pop_all()
            return self
        if self.spool_name is not None:
            log.info(
                "producer: no spool (%s)",
                "B24QUEUE_SPOOL_ENABLED is false"
                if transport.needs_spool
                else f"the {transport.name} queue is on this host's disk",
            )
        self._sink = self._lazy = LazyPublisher(
            lambda: transport.publisher(name), self.settings.publish_timeout_s
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        lazy, self._lazy, self._sink = self._lazy, None, None
        store, self._store = self._store, None
        try:
            if lazy is not None:
                await lazy.close()
            await self._stack.aclose()
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
        if self._sink is None:
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
        await self._sink.publish(envelope)
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
