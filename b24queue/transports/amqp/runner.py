"""Consumers on RabbitMQ: one channel per consumer, manual acks, prefetch, and the AMQP
`Settler` that carries out the delivery rules of `b24queue.delivery`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any, NamedTuple

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.abc import DeliveredMessage

from b24queue import _constants as c
from b24queue.consumer import EventConsumer
from b24queue.delivery import Incoming, Outcome, process
from b24queue.queues import QueueSpec, portal_key
from b24queue.settings import Settings
from b24queue.telemetry.metrics import WorkerMetrics
from b24queue.transports.amqp import fast_consume
from b24queue.transports.amqp.connection import CONNECT_ERRORS, PUBLISH_ERRORS, TRANSIENT_ERRORS
from b24queue.transports.amqp.publisher import persistent_copy
from b24queue.transports.amqp.topology import declare_consumer_queues
from b24queue.transports.kit.fair import Waiting
from b24queue.transports.kit.inflight import HandlingRunner

log = logging.getLogger(__name__)

# After a failed retry/dead-letter publish, wait before handing the delivery back, so a broken
# retry queue cannot turn into a hot redelivery loop.
REQUEUE_BACKOFF_S = 1.0


# What each source of a queue read from several (a fair queue's shards and the queue itself) may
# hold unacked: two per handler slot and a few more, so that a portal whose handlers hold all
# slots but one still has deliveries waiting when a slot frees, though the broker's next one is a
# round trip behind its ack. (One per slot: weights of 3 to 1 came out 1 to 1 with handlers of
# 2 ms; two per slot: 2.2 to 1 on a loaded machine. Idle time earns a portal no turns.)
def source_prefetch(slots: int) -> int:
    return 2 * slots + 16


class Delivery(NamedTuple):
    """What settling one delivery needs: the aiormq channel it came on (delivery tags are per
    channel), its tag, and its properties (for a retry or dead-letter copy)."""

    channel: aiormq.abc.AbstractChannel
    delivery_tag: int
    properties: aiormq.spec.Basic.Properties


class ChannelSettler:
    """Settles deliveries of one consumer's channel."""

    def __init__(self, channel: AbstractRobustChannel, spec: QueueSpec) -> None:
        self._channel = channel
        self._spec = spec
        self._acks = fast_consume.Acks()

    async def settle(self, incoming: Incoming, outcome: Outcome) -> None:
        delivery: Delivery = incoming.handle
        if outcome.kind != "ack":
            target = (
                self._spec.retry_queue(outcome.delay_s or 0)
                if outcome.kind == "retry"
                else self._spec.dlq
            )
            if not await self._republish(incoming, target, outcome.headers):
                await self._requeue(delivery)
                return
        await self._ack(delivery, incoming.message_id)

    async def acks_written(self) -> None:
        """Before the channel closes: the acks of the last deliveries go ahead of its Close."""
        await self._acks.written(timeout_s=1.0)

    async def _republish(self, incoming: Incoming, queue: str, headers: dict[str, Any]) -> bool:
        copy = persistent_copy(incoming.body, incoming.handle.properties, headers)
        try:
            # Default exchange, queue name as routing key: reaches exactly that queue, and a
            # missing queue comes back as a return (mandatory), not a silent drop.
            await self._channel.default_exchange.publish(copy, routing_key=queue, mandatory=True)
        except PUBLISH_ERRORS as exc:
            log.error(
                "could not move message_id=%s to %s (%r); it stays in %s",
                incoming.message_id,
                queue,
                exc,
                self._spec.name,
            )
            return False
        return True

    async def _ack(self, delivery: Delivery, message_id: str | None) -> None:
        channel = delivery.channel
        if channel.is_closed:
            # The broker requeued it when that channel died; a new channel cannot ack it.
            log.info(
                "not acking message_id=%s: its channel is gone, the broker redelivers it",
                message_id,
            )
            return
        try:
            if fast_consume.usable(channel):
                self._acks.add(channel, delivery.delivery_tag)  # type: ignore[arg-type]
            else:
                await channel.basic_ack(delivery.delivery_tag)
        except TRANSIENT_ERRORS as exc:
            log.info("ack of message_id=%s failed (%r); the broker redelivers it", message_id, exc)

    async def _requeue(self, delivery: Delivery) -> None:
        await asyncio.sleep(REQUEUE_BACKOFF_S)
        if delivery.channel.is_closed:
            return
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await delivery.channel.basic_nack(delivery.delivery_tag, requeue=True)


class ConsumerRunner(HandlingRunner):
    """Runs one `EventConsumer` on its own channel of a shared connection.

    Handlers run in tasks we own (not the channel's), so a dropped connection does not cancel a
    handler halfway: it finishes, its ack is skipped, and the broker redelivers the message.

    A fair queue (or one a fair worker left shards of) is consumed from each shard and from the
    queue itself, one consumer each with a prefetch of its own (`source_prefetch`): one portal's
    flood, alone in its shard, can take every slot, and holds no other shard's deliveries back.
    At most `prefetch` handlers run; the other deliveries wait in `Waiting` until a slot frees,
    and the slots go to their portals in turn (docs/fairness.md). A queue with one source starts
    each delivery as it comes, with `prefetch` as the broker's limit, as before.
    """

    def __init__(
        self,
        consumer: EventConsumer,
        settings: Settings,
        connection: AbstractRobustConnection,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        super().__init__(consumer, metrics, on_done=self._next)
        self._settings = settings
        self._connection = connection
        self._channel: AbstractRobustChannel | None = None
        self._queue: Any = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._waiting: Waiting | None = None  # several sources: deliveries wait for a slot
        self._stopping = False
        self._settler: ChannelSettler | None = None
        self._task_name = f"b24queue-{self.spec.name}"
        self._settled: asyncio.Future[None]

    async def start(self) -> None:
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        assert isinstance(channel, aio_pika.RobustChannel)
        self._channel = channel
        queues = await declare_consumer_queues(
            channel, self._settings, self.spec, type(self.consumer).__name__
        )
        self._queue = queues.queue
        prefetch = self.consumer.prefetch
        if queues.shards:
            self._waiting = Waiting(self.spec.fairness)
            prefetch = source_prefetch(prefetch)
        # Per-consumer QoS (global=False): global QoS on a quorum queue closes the connection.
        await channel.set_qos(prefetch_count=prefetch)
        self._settler = ChannelSettler(channel, self.spec)
        await self.consumer.on_start()
        self._settled = asyncio.get_running_loop().create_future()
        self._settled.set_result(None)
        for queue in [queues.queue, *queues.shards]:
            tag = await queue.consume(
                self._on_message, no_ack=False, consumer_tag=self._tag_name(queue.name)
            )
            self._consumers.append((queue, tag))
        log.info(
            "consuming %s%s (bindings %s, prefetch %d, max_attempts %d, retry delays %s: "
            "Retry(delay_s=...) waits the first of these at least as long)",
            self.spec.name,
            f" and its {len(queues.shards)} shards" if queues.shards else "",
            ",".join(self.spec.bindings),
            self.consumer.prefetch,
            self.consumer.max_attempts,
            ", ".join(f"{d:g}s" for d in sorted(set(self.spec.retry_delays_s))),
        )

    @property
    def queue(self) -> AbstractQueue:
        assert self._queue is not None, "start() first"
        queue: AbstractQueue = self._queue
        return queue

    def _tag_name(self, queue: str) -> str:
        return f"b24queue.{queue}.{socket.gethostname()}.{os.getpid()}"

    def _on_message(self, message: AbstractIncomingMessage) -> asyncio.Future[None]:
        # aio-pika's callback: a channel's first deliveries (or every one, where `fast_consume`
        # cannot be used) come this way. Not a coroutine: the handling runs in our own task,
        # which a channel close does not cancel. aio-pika awaits what this returns (and warns
        # when it is not awaitable): a future that is already done costs nothing to await.
        try:
            channel = message.channel
        except aio_pika.exceptions.ChannelInvalidStateError:
            return self._settled  # closed before we saw it: the broker redelivers it
        if fast_consume.usable(channel) and message.consumer_tag is not None:
            fast_consume.take_over(channel, message.consumer_tag, self._on_delivered)  # type: ignore[arg-type]
        headers = message.headers
        self._start(
            message.body,
            message.routing_key or "",
            headers,
            bool(message.redelivered),
            Delivery(channel, message.delivery_tag or 0, message.properties),
        )
        return self._settled

    def _on_delivered(self, message: DeliveredMessage) -> None:
        # The channel's reader calls this once taken over (`fast_consume`); the handling goes on
        # in a task of our own.
        deliver: Any = message.delivery
        properties = message.header.properties
        self._start(
            message.body,
            deliver.routing_key,
            properties.headers or {},
            deliver.redelivered,
            Delivery(message.channel, deliver.delivery_tag, properties),
        )

    def _start(
        self,
        body: bytes,
        routing_key: str,
        headers: dict[str, Any],
        redelivered: bool,
        delivery: Delivery,
    ) -> None:
        properties = delivery.properties
        incoming = Incoming(
            body=body,
            message_id=properties.message_id,
            routing_key=str(headers.get(c.H_ORIGINAL_ROUTING_KEY) or routing_key),
            headers=headers,
            redelivered=bool(redelivered),
            accepted_at=properties.timestamp,
            handle=delivery,
        )
        if self._waiting is None:
            self._handle(incoming)
            return
        self._waiting.put(portal_key(headers.get(c.H_MEMBER_ID)), incoming)
        self._next()

    def _handle(self, incoming: Incoming) -> None:
        assert self._settler is not None
        self._tasks.start(
            process(self.consumer, incoming, self.spec.name, self._settler, self._observe),
            self._task_name,
        )

    def _next(self, done: object = None) -> None:
        """Free slots to the deliveries waiting, portal by portal (as each handler ends, too)."""
        waiting = self._waiting
        while waiting and not self._stopping and len(self._tasks) < self.consumer.prefetch:
            incoming: Incoming = waiting.take()
            if incoming.handle.channel.is_closed:
                continue  # the broker delivers it again, on the channel that replaces this one
            self._handle(incoming)

    async def stop_consuming(self) -> None:
        """Ask the broker for no more deliveries; in-flight ones go on, those waiting for a slot
        go back to their queue."""
        self._stopping = True
        for queue, tag in self._consumers:
            try:
                await asyncio.wait_for(queue.cancel(tag), timeout=5)
            except CONNECT_ERRORS as exc:
                log.info("cancel of consumer %s failed (%r)", queue.name, exc)
        self._consumers = []
        if self._waiting is not None:
            for incoming in self._waiting.drain():
                channel = incoming.handle.channel
                if channel.is_closed:
                    continue
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    await channel.basic_nack(incoming.handle.delivery_tag, requeue=True)

    # `drain`: cancelled handlers leave their messages unacked; the broker redelivers them once
    # this channel closes.

    async def _release(self) -> None:
        if self._settler is not None:
            await self._settler.acks_written()
        if self._channel is not None and not self._channel.is_closed:
            await asyncio.gather(self._channel.close(), return_exceptions=True)
