"""Declaring the layout of `transports.amqp.layout` on the broker, idempotently."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from b24queue.errors import TopologyMismatchError
from b24queue.queues import DeclaredQueue, QueueSpec
from b24queue.settings import Settings
from b24queue.transports.amqp import layout, shards
from b24queue.transports.amqp.layout import queue_arguments, retry_queue_arguments

T = TypeVar("T")


async def declare_exchanges(channel: AbstractChannel, settings: Settings) -> AbstractExchange:
    """The events exchange, with its alternate exchange and queue. Returns the events exchange."""
    unrouted_x = await _guard(
        "exchange",
        settings.unrouted,
        lambda: channel.declare_exchange(
            settings.unrouted, aio_pika.ExchangeType.FANOUT, durable=True
        ),
    )
    unrouted_q = await _declare_queue(channel, settings.unrouted, queue_arguments(settings))
    await unrouted_q.bind(unrouted_x, routing_key="")
    return await _guard(
        "exchange",
        settings.exchange,
        lambda: channel.declare_exchange(
            settings.exchange,
            aio_pika.ExchangeType.TOPIC,
            durable=True,
            arguments={"alternate-exchange": settings.unrouted},
        ),
    )


@dataclass(frozen=True, slots=True)
class ConsumerQueues:
    """A consumer's queue and the queues its events wait in: the shards of a fair queue (or
    those a fair worker left, when it is fair no more) and the queue itself."""

    queue: AbstractQueue
    shards: list[AbstractQueue]


async def declare_consumer_queues(
    channel: AbstractChannel, settings: Settings, spec: QueueSpec, owner: str
) -> ConsumerQueues:
    """DLQ, retry queues, then the queue, its shards and their bindings: targets exist before
    their sources (`shards` on the order of the bindings). `owner`: the consumer class, for
    errors.

    Declared on a robust channel, all of these are declared again after a reconnect.
    """
    exchange = await declare_exchanges(channel, settings)
    await _declare_queue(channel, spec.dlq, queue_arguments(settings))
    for delay_s in sorted(set(spec.retry_delays_s)):
        await _declare_queue(
            channel,
            spec.retry_queue(delay_s),
            retry_queue_arguments(settings, spec.name, delay_s),
        )
    queue = await _declare_queue(channel, spec.name, queue_arguments(settings))
    fair = spec.fairness.on
    if not fair:
        for key in spec.bindings:
            await queue.bind(exchange, routing_key=key)
        if not await shards.left_behind(channel, spec):
            return ConsumerQueues(queue, [])
    shard_queues = [
        await _declare_queue(channel, name, queue_arguments(settings))
        for name in layout.shards(spec)
    ]
    if fair:
        await shards.enter(channel, spec, exchange, queue, shard_queues, owner)
    else:
        await shards.leave(channel, spec, settings.exchange)
    return ConsumerQueues(queue, shard_queues)


async def unbind(queue: AbstractQueue, exchange: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        await queue.unbind(exchange, routing_key=key)


async def _declare_queue(
    channel: AbstractChannel, name: str, arguments: dict[str, Any]
) -> AbstractQueue:
    return await _guard(
        "queue",
        name,
        lambda: channel.declare_queue(name, durable=True, arguments=arguments),
    )


async def _guard(kind: str, name: str, declare: Callable[[], Awaitable[T]]) -> T:
    try:
        return await declare()
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        # The broker's text names the argument and both values, e.g.
        # "inequivalent arg 'x-queue-type' for queue 'q' ...: received 'classic' but current is
        # 'quorum'". We never change an existing queue: that is an operator's decision.
        detail = exc.args[0] if exc.args else str(exc)
        raise TopologyMismatchError(
            f"{kind} {name!r} already exists with different arguments: {detail}. "
            f"Declare it with the same settings, or delete it (after draining it) to recreate."
        ) from None


async def inspect_queue(
    channel: AbstractChannel, name: str, arguments: dict[str, Any]
) -> DeclaredQueue:
    """Ready-message and consumer counts of an existing queue (passive declare)."""
    queue = await channel.declare_queue(name, passive=True)
    result = queue.declaration_result
    return DeclaredQueue(name, result.message_count or 0, result.consumer_count or 0, arguments)
