"""The app's own messages: published from a handler (`EventConsumer.publish`, through the
delivery's outbox) or from application code (`Producer`), routed by name through the same
topology as Bitrix24's events, so another consumer binds one as it binds an event
(`events = ("APP.DEAL.RECHECK",)`).

A message is an event in shape: `{"event": NAME, "data": ..., "ts": ..., "auth": {"domain",
"member_id"}}`, never a token (the body goes through `message_body`, which drops every token key
at any depth). Its portal travels as the ingress's events carry it: `x-b24-domain`,
`x-b24-member-id` and the digest of the portal's application token (`x-b24-token-sha256`), so
the next handler's `self.portal(event)` calls that portal as the first one could.

Names start with `APP.` (`APP_PREFIX`), which the ingress refuses from outside: a message of the
app's own can never be forged through the ingress, and never shadows a Bitrix24 event.

Message ids are deterministic where a duplicate can happen: a handler's message from (queue,
the delivery's message id, name, its key or its index in the handler), so a handler retried,
or a worker killed between the publish and its ack, publishes the same ids again; a
`Producer.publish` with `key=` from (name, portal, key). The queues keep no index of message ids:
a duplicate is delivered, with the same id, and the consuming class's `idempotency` store
(b24queue.idempotency) drops it (docs/publishing.md).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from b24queue import _constants as c
from b24queue.errors import (
    EXIT_USAGE,
    B24QueueError,
    BadEventError,
    BrokerUnavailableError,
    ConfigError,
)
from b24queue.events.envelope import (
    MAX_HEADER_CHARS,
    Envelope,
    EventSink,
    message_body,
    new_message_id,
    token_digest,
)
from b24queue.events.event import EVENT_NAME, MAX_EVENT_NAME, Event, token_digest_of

log = logging.getLogger(__name__)

APP_PREFIX = "APP."
MAX_KEY = 200  # characters of an idempotency key
MAX_PER_DELIVERY = 1000  # messages one handler may publish in one attempt (held in memory)
MAX_DATA_BYTES = 512 * 1024  # a message's JSON body


class PublishInputError(B24QueueError, ValueError):
    """What was asked to be published is not publishable; `field` names the argument."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Origin:
    """Whose portal a message is of, and where it comes from (none of it a secret: the token
    is kept only as its digest, as the ingress keeps it)."""

    domain: str | None = None
    member_id: str | None = None
    token_digest: str | None = None
    caused_by: str | None = None
    correlation_id: str | None = None

    @classmethod
    def of_event(cls, event: Event) -> Origin:
        """The portal of `event` (one the ingress accepted, or one built in code)."""
        auth = event.auth
        digest = (
            token_digest(auth.application_token)
            if auth.application_token
            else token_digest_of(event)
        )
        return cls(auth.domain, auth.member_id, digest)


def check_name(name: object) -> str:
    """A name the app may publish: `APP.` and dot-separated words (letters, digits, _), upper
    case as the ingress upper-cases event names."""
    if not isinstance(name, str) or len(name) > MAX_EVENT_NAME or not EVENT_NAME.fullmatch(name):
        raise PublishInputError(
            f"name: {str(name)[:MAX_EVENT_NAME]!r} is not a message name: words of letters, "
            f"digits and _ separated by single dots, at most {MAX_EVENT_NAME} characters",
            "name",
        )
    upper = name.upper()
    if not upper.startswith(APP_PREFIX):
        raise PublishInputError(
            f"name: {upper!r} must start with {APP_PREFIX!r} (e.g. APP.DEAL.RECHECK): the "
            "Bitrix24 event names are the portal's",
            "name",
        )
    return upper


def from_outside(event: Event) -> Event:
    """`event`, unless it is named as the app's own messages are (the ingress refuses those:
    nobody outside may publish one)."""
    if event.name.startswith(APP_PREFIX):
        raise BadEventError(
            f"names starting with {APP_PREFIX} are the app's own messages, not Bitrix24's",
            field="event",
        )
    return event


def check_key(key: object) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY:
        raise PublishInputError(f"key: must be a str of 1 to {MAX_KEY} characters", "key")
    return key


def check_delay(delay_s: object) -> None:
    """Delays are not offered yet: 0 (the default) only."""
    if delay_s != 0:
        raise PublishInputError(
            "delay_s: delayed messages are not offered yet; publish with delay_s=0 (the default)",
            "delay_s",
        )


def derived_id(*parts: str) -> str:
    """A message id (32 hex digits, as `new_message_id`'s) fixed by `parts`."""
    digest = hashlib.sha256("\0".join(("b24queue", *parts)).encode()).hexdigest()
    return digest[:32]


def app_envelope(name: str, data: Any, origin: Origin, message_id: str) -> Envelope:
    """The message: an event's shape (its `data`, the portal's domain and member_id in `auth`),
    the portal, causation and correlation in headers."""
    now = datetime.now(UTC)
    auth = {k: v for k, v in (("domain", origin.domain), ("member_id", origin.member_id)) if v}
    payload = {"event": name, "data": {} if data is None else data, "ts": int(now.timestamp())}
    payload["auth"] = auth
    try:
        body = message_body(payload)
    except TypeError as exc:
        raise PublishInputError(f"data: not JSON ({exc})", "data") from None
    if len(body) > MAX_DATA_BYTES:
        raise PublishInputError(
            f"data: {len(body)} bytes as JSON, more than {MAX_DATA_BYTES}", "data"
        )
    headers: dict[str, str] = {}
    for header, value in (
        (c.H_DOMAIN, origin.domain),
        (c.H_MEMBER_ID, origin.member_id),
        (c.H_TOKEN_DIGEST, origin.token_digest),
        (c.H_CAUSED_BY, origin.caused_by),
        (c.H_CORRELATION_ID, origin.correlation_id),
    ):
        if value:
            headers[header] = value
    if sum(len(k) + len(v) for k, v in headers.items()) + len(name) > MAX_HEADER_CHARS:
        raise PublishInputError("portal: its domain and member_id are too long", "portal")
    return Envelope(message_id, name, body, headers, now, name)


class Outbox:
    """What one attempt of one delivery's handler published, held until its outcome is known:
    released (published, confirmed) only if the handler returned, before its ack. Made for every
    delivery, so it costs nothing until the first message: the portal and the chain are read
    then."""

    __slots__ = ("_event", "_headers", "_message_id", "_origin", "closed", "envelopes", "queue")

    def __init__(
        self, queue: str, event: Event, message_id: str | None, headers: Mapping[str, Any]
    ) -> None:
        self.queue = queue
        self._event = event
        self._message_id = message_id
        self._headers = headers
        self._origin: Origin | None = None
        self.envelopes: list[Envelope] = []
        self.closed = False  # the handler ended: a task it left running may not add any more

    @property
    def delivery_id(self) -> str:
        """The delivery's message id (made up once for a message that has none)."""
        if self._message_id is None:
            self._message_id = new_message_id()
        return self._message_id

    @property
    def origin(self) -> Origin:
        """The event's portal; caused by this delivery; its chain's correlation id, or a new
        chain's (this delivery's message id)."""
        if self._origin is None:
            correlation = self._headers.get(c.H_CORRELATION_ID)
            if not isinstance(correlation, str) or not 1 <= len(correlation) <= 64:
                correlation = self.delivery_id
            base = Origin.of_event(self._event)
            self._origin = Origin(
                base.domain, base.member_id, base.token_digest, self.delivery_id, correlation
            )
        return self._origin

    def add(self, name: object, data: Any, key: object, delay_s: object) -> str:
        if self.closed:
            raise ConfigError(
                "publish(): its event's handler has returned (a task it left running?); "
                "publish before handle returns, or use b24queue.Producer"
            )
        checked = check_name(name)
        key_ = check_key(key)
        check_delay(delay_s)
        if len(self.envelopes) >= MAX_PER_DELIVERY:
            raise PublishInputError(
                f"a handler may publish at most {MAX_PER_DELIVERY} messages per event", "name"
            )
        seed = f"key:{key_}" if key_ is not None else f"index:{len(self.envelopes)}"
        message_id = derived_id("handler", self.queue, self.delivery_id, checked, seed)
        if key_ is not None and any(e.message_id == message_id for e in self.envelopes):
            return message_id  # the same name and key again: one message (the first)
        envelope = app_envelope(checked, data, self.origin, message_id)
        self.envelopes.append(envelope)
        return message_id


_OUTBOX: contextvars.ContextVar[Outbox | None] = contextvars.ContextVar(
    "b24queue_outbox", default=None
)


def outbox_for(
    queue: str, event: Event, message_id: str | None, headers: Mapping[str, Any]
) -> Outbox:
    """The outbox of a delivery of `event`: its messages carry the event's portal, are caused
    by it, and keep its correlation id (or start one: the delivery's message id)."""
    return Outbox(queue, event, message_id, headers)


def open_outbox(outbox: Outbox) -> contextvars.Token[Outbox | None]:
    return _OUTBOX.set(outbox)


def close_outbox(token: contextvars.Token[Outbox | None]) -> None:
    outbox = _OUTBOX.get()
    if outbox is not None:
        outbox.closed = True
    _OUTBOX.reset(token)


def current_outbox() -> Outbox | None:
    return _OUTBOX.get()


async def release(sink: EventSink, envelopes: list[Envelope]) -> None:
    """Publish a handler's messages, each confirmed (durable) before this returns; raises the
    first failure (some may be durable already: published again, same ids, on the retry)."""
    await asyncio.gather(*(sink.publish(e) for e in envelopes))


class LazyPublisher:
    """A worker's (or a `Producer`'s) publisher: connected at the first message (a worker whose
    handlers publish nothing opens nothing), waiting up to `wait_s` for the connection before a
    publish fails. `opens`: the transport's publisher, made (`transport.publisher(name)`)."""

    def __init__(
        self, opens: Callable[[], AbstractAsyncContextManager[EventSink]], wait_s: float
    ) -> None:
        self._opens = opens
        self._wait_s = wait_s
        self._held: AbstractAsyncContextManager[EventSink] | None = None
        self._publisher: EventSink | None = None
        self._lock = asyncio.Lock()

    async def publish(self, envelope: Envelope) -> None:
        publisher = self._publisher or await self._open()
        await when_ready(publisher, self._wait_s)
        await publisher.publish(envelope)

    def is_ready(self) -> bool:
        return self._publisher is not None and self._publisher.is_ready()

    async def _open(self) -> EventSink:
        async with self._lock:
            if self._publisher is None:
                held = self._opens()
                self._publisher = await held.__aenter__()
                self._held = held
            return self._publisher

    async def close(self) -> None:
        held, self._held, self._publisher = self._held, None, None
        if held is not None:
            await held.__aexit__(None, None, None)


async def when_ready(publisher: EventSink, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while not publisher.is_ready():
        if time.monotonic() >= deadline:
            raise BrokerUnavailableError(f"the queue was not reachable within {wait_s:g}s")
        await asyncio.sleep(0.05)
