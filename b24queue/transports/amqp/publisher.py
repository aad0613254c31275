"""Confirmed, persistent publishing for the ingress: `publish` returns only once RabbitMQ has the
event on disk (publisher confirm), or raises.

The connection is made in the background, so the ingress can start (and answer 503) while the
broker is down, and recovers without a restart when it comes back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractRobustConnection,
)
from pamqp.commands import Basic
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from b24queue import _constants as c
from b24queue.errors import BrokerUnavailableError, PublishError
from b24queue.events.envelope import Envelope
from b24queue.settings import Settings
from b24queue.timeouts import within
from b24queue.transports.amqp import fast_publish, internals
from b24queue.transports.amqp.connection import TRANSIENT_ERRORS, close_quietly, connect
from b24queue.transports.amqp.topology import declare_exchanges
from b24queue.transports.kit.publisher import ReconnectingPublisher

log = logging.getLogger(__name__)


def properties_for(envelope: Envelope) -> Basic.Properties:
    """The AMQP properties of an event's message (built directly: aio-pika's `Message` costs
    ~10 us more per event on the ingress's hot path, for the same bytes on the wire)."""
    return Basic.Properties(
        content_type=c.CONTENT_TYPE,
        content_encoding="utf-8",
        headers=dict(envelope.headers),
        # Not the default: without it a broker restart loses the event.
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
        message_id=envelope.message_id,
        timestamp=envelope.timestamp,
        message_type=envelope.event_type,
        app_id=c.APP_ID,
    )


def persistent_copy(
    body: bytes, properties: aiormq.spec.Basic.Properties, headers: dict[str, Any]
) -> aio_pika.Message:
    """A delivered message, to publish again (retry, dead-letter, replay): same body and
    properties, new headers, persistent."""
    return aio_pika.Message(
        body=body,
        headers=headers,
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=properties.message_id,
        correlation_id=properties.correlation_id,
        timestamp=properties.timestamp,
        type=properties.message_type,
        app_id=properties.app_id,
    )


# Headers are bounded at the edge (`envelope.MAX_HEADER_CHARS`), and the sum again here, in bytes:
# with the fixed properties it stays far below any frame_max RabbitMQ negotiates (4 KiB at the
# least, 128 KiB by default). A larger header frame would close the whole connection (FRAME_ERROR)
# and, spooled and forwarded again, close it every time.
MAX_HEADER_BYTES = 3 * 1024
# RabbitMQ closes the channel for a message over its max_message_size (128 MiB on 3.x, 16 MiB on
# 4.x), failing every publish in flight on it. Bodies are bounded (B24QUEUE_MAX_BODY_BYTES, at
# most 8 MiB, and a message is at most about twice its body), so this is a last guard.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def check_size(envelope: Envelope) -> None:
    """Refuse, before it reaches the wire, a message the broker would not take (a header frame
    that breaks the connection, a body over its size limit): a permanent `PublishError`."""
    size = len(envelope.routing_key.encode()) + len(envelope.event_type.encode())
    for key, value in envelope.headers.items():
        size += len(key.encode()) + len(value.encode())
    if size > MAX_HEADER_BYTES:
        raise PublishError(f"the message's headers exceed {MAX_HEADER_BYTES} bytes", permanent=True)
    if len(envelope.body) > MAX_MESSAGE_BYTES:
        raise PublishError(f"the message exceeds {MAX_MESSAGE_BYTES} bytes", permanent=True)


class AmqpPublisher(ReconnectingPublisher):
    """An `EventSink` on one robust connection and one confirming channel."""

    server = "RabbitMQ"

    def __init__(self, settings: Settings, connection_name: str) -> None:
        super().__init__(settings, connection_name)
        self._connection: AbstractRobustConnection | None = None
        # Strong references: robust connections keep channels in a WeakSet only.
        self._channel: AbstractChannel | None = None
        self.connected = asyncio.Event()
        # `breaks` counts the channels and connections closed under us: an event that breaks
        # them every time is moved aside by the spool's forwarder. The unrouted queue's cap is
        # RabbitMQ's (a policy, `layout.unrouted_policy`): it drops the oldest itself and counts
        # them; nothing is dropped here.
        self._renewing: asyncio.Task[None] | None = None
        self._renewed_at = float("-inf")

    async def _close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
        if self._channel is not None and not self._channel.is_closed:
            await asyncio.gather(self._channel.close(), return_exceptions=True)
        await close_quietly(self._connection)

    async def _keep(self) -> None:
        """Connect, then open the publishing channel: from then on the robust connection (and
        aio-pika's channel on it) reconnect by themselves."""
        connection = self._connection = await connect(self._settings, self._name)
        connection.close_callbacks.add(self._closed)

        async def channel() -> AbstractChannel:
            # A connection lost while the channel opens fails it with whatever aio-pika or
            # aiormq were doing at that moment: a connection error, RuntimeError("Connection
            # was not opened"), even a bare Exception. The robust connection comes back by
            # itself; wait for it and open the channel again.
            await connection.connected.wait()
            return await self._open_channel(connection)

        self._channel = await self._until_up(channel, "publishing channel")
        self.connected.set()
        log.info("publishing to exchange %r (confirms on)", self._settings.exchange)

    def _closed(self, *_: object) -> None:
        self.breaks += 1

    def _renew_channel(self) -> None:
        """Publish on a new channel from now on (at most once per second). A nack means a queue
        could not take the message; after a quorum queue's leader moved, RabbitMQ 3.10 was seen
        to nack every later publish on the channel that first published to it while the old
        leader was being declared dead, for as long as that channel lived (a new channel
        published fine): the spool's forwarder would retry on it for ever."""
        now = asyncio.get_running_loop().time()
        if self._renewing is not None or now < self._renewed_at + 1.0:
            return
        self._renewed_at = now
        self._renewing = asyncio.create_task(self._swap_channel(), name="b24queue-renew-channel")

    async def _swap_channel(self) -> None:
        try:
            connection = self._connection
            if connection is None:
                return
            await asyncio.wait_for(connection.connected.wait(), self._settings.connect_timeout_s)
            fresh = await self._open_channel(connection)
            old, self._channel = self._channel, fresh
            log.warning("publishing on a new channel after a nack")
            if old is not None:
                old.close_callbacks.discard(self._closed)  # closed by us: not a break
                # Publishes already under way on it keep their time to be confirmed.
                await asyncio.sleep(self._settings.publish_timeout_s + 1)
                await asyncio.gather(old.close(), return_exceptions=True)
        except Exception as exc:  # the next nack tries again
            log.warning("could not open a new publishing channel: %r", exc)
        finally:
            self._renewing = None

    async def _open_channel(self, connection: AbstractRobustConnection) -> AbstractChannel:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        # A channel the broker closes (and aio-pika reopens) counts as a break too.
        channel.close_callbacks.add(self._closed)
        try:
            await declare_exchanges(channel, self._settings)
        except BaseException:
            await asyncio.gather(channel.close(), return_exceptions=True)
            raise
        return channel

    def is_ready(self) -> bool:
        conn, channel = self._connection, self._channel
        return (
            conn is not None
            and conn.connected.is_set()
            and channel is not None
            and not channel.is_closed
            and not self._blocked()
        )

    def _blocked(self) -> bool:
        underlay = getattr(self._connection, "transport", None)
        return underlay is not None and internals.blocked(underlay.connection)

    async def publish(self, envelope: Envelope) -> None:
        channel = self._channel
        if channel is None:
            raise BrokerUnavailableError("not connected to RabbitMQ yet")
        check_size(envelope)
        timeout_s = self._settings.publish_timeout_s
        try:
            await within(timeout_s, self._publish_until_confirmed(channel, envelope))
        except TimeoutError:
            raise BrokerUnavailableError(
                f"RabbitMQ did not confirm within {timeout_s:g}s"
            ) from None
        except aio_pika.exceptions.PublishError as exc:
            # Only when even the alternate exchange could not route it.
            raise PublishError(
                f"RabbitMQ returned the message as unroutable: {exc}", returned=True
            ) from None
        except aio_pika.exceptions.DeliveryError as exc:
            self._renew_channel()
            raise PublishError(f"RabbitMQ refused the message (nack): {exc}") from None
        except TRANSIENT_ERRORS as exc:
            raise BrokerUnavailableError(f"connection to RabbitMQ failed: {exc!r}") from None

    async def _publish_until_confirmed(self, channel: AbstractChannel, envelope: Envelope) -> None:
        try:
            await self._publish_once(channel, envelope)
        except TRANSIENT_ERRORS:
            # A publish cut by a dropped connection is not replayed by aio-pika; repeat it until
            # the deadline. The broker may then hold it twice: at-least-once, never lost. (Off
            # the hot path: the first attempt needs no retry machinery.)
            await self._publish_retrying(channel, envelope)

    async def _publish_once(self, channel: AbstractChannel, envelope: Envelope) -> None:
        # Straight on the channel aio-pika keeps open (and reopens after a reconnect): the
        # same confirm, mandatory flag and returned/nack errors as `Exchange.publish`. Never on
        # a connection RabbitMQ blocked: it would not read it (first attempt or retry alike).
        if self._blocked():
            raise BrokerUnavailableError("RabbitMQ blocked publishing (a memory or disk alarm)")
        underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        if fast_publish.usable(underlay):
            try:
                await fast_publish.publish(underlay, self._settings.exchange, envelope)
            except ValueError as exc:  # nothing was sent
                raise PublishError(f"the message cannot be sent: {exc}", permanent=True) from None
            return
        # (`wait` is on aiormq's Channel, not on its abstract interface.)
        await underlay.basic_publish(
            envelope.body,
            exchange=self._settings.exchange,
            routing_key=envelope.routing_key,
            properties=properties_for(envelope),
            mandatory=True,
            # Wait for the confirm only, not also for the frame to leave the socket buffer: the
            # confirm cannot come before that, and a connection lost first fails it all the same.
            wait=False,
        )

    async def _publish_retrying(self, channel: AbstractChannel, envelope: Envelope) -> None:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(TRANSIENT_ERRORS),
            wait=wait_exponential(multiplier=0.02, max=0.2),
            reraise=True,
        ):
            with attempt:
                # The current channel: a nack may have moved publishing to a new one.
                await self._publish_once(self._channel or channel, envelope)
