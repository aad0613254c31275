"""Exchanges and queues: names, arguments, and idempotent declaration.

Names (defaults; the exchange names come from settings):
  b24.events           topic exchange, routing key = event name; alternate exchange b24.unrouted
  b24.unrouted         fanout exchange + queue: events no consumer is bound to are kept here
  <queue>              a consumer's queue, bound to b24.events for its events
  <queue>.retry.<d>    one per retry delay: queue-wide TTL, then dead-lettered back to <queue> only
  <queue>.dlq          what failed for good; `b24queue dlq` inspects and replays it
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from b24queue import _constants as c
from b24queue.errors import TopologyMismatchError
from b24queue.settings import Settings

T = TypeVar("T")


def retry_queue_name(queue: str, delay_s: float) -> str:
    if float(delay_s).is_integer():
        return f"{queue}{c.RETRY_SUFFIX}{int(delay_s)}s"
    return f"{queue}{c.RETRY_SUFFIX}{round(delay_s * 1000)}ms"


def dlq_name(queue: str) -> str:
    return queue + c.DLQ_SUFFIX


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """What a consumer needs declared. `bindings` are routing keys or topic patterns."""

    name: str
    bindings: tuple[str, ...]
    retry_delays_s: tuple[float, ...]

    @property
    def dlq(self) -> str:
        return dlq_name(self.name)

    def retry_queue(self, delay_s: float) -> str:
        return retry_queue_name(self.name, delay_s)


def queue_arguments(settings: Settings) -> dict[str, Any]:
    return {"x-queue-type": settings.queue_type}


def retry_queue_arguments(settings: Settings, target: str, delay_s: float) -> dict[str, Any]:
    args: dict[str, Any] = {
        **queue_arguments(settings),
        "x-message-ttl": round(delay_s * 1000),
        # The default exchange with the queue's own name delivers to that queue only: a retry
        # must not reach other consumers bound to the same event.
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": target,
    }
    if settings.queue_type == "quorum":
        # Classic dead-lettering is at-most-once; quorum queues can do at-least-once, which
        # needs reject-publish overflow. A retry must not vanish on its way back.
        args["x-dead-letter-strategy"] = "at-least-once"
        args["x-overflow"] = "reject-publish"
    return args


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


async def declare_consumer_queues(
    channel: AbstractChannel, settings: Settings, spec: QueueSpec
) -> AbstractQueue:
    """DLQ, retry queues, then the queue and its bindings: targets exist before their sources.

    Returns the consumer's queue. Declared on a robust channel, all of these are declared again
    after a reconnect.
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
    for key in spec.bindings:
        await queue.bind(exchange, routing_key=key)
    return queue


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


@dataclass(frozen=True, slots=True)
class QueueState:
    name: str
    messages: int
    consumers: int
    arguments: dict[str, Any]


async def inspect_queue(
    channel: AbstractChannel, name: str, arguments: dict[str, Any]
) -> QueueState:
    """Ready-message and consumer counts of an existing queue (passive declare)."""
    queue = await channel.declare_queue(name, passive=True)
    result = queue.declaration_result
    return QueueState(name, result.message_count or 0, result.consumer_count or 0, arguments)


def queue_plan(settings: Settings, spec: QueueSpec) -> list[tuple[str, dict[str, Any]]]:
    """Every queue of a consumer with the arguments we declare it with."""
    plan = [(spec.name, queue_arguments(settings))]
    plan += [
        (spec.retry_queue(d), retry_queue_arguments(settings, spec.name, d))
        for d in sorted(set(spec.retry_delays_s))
    ]
    plan.append((spec.dlq, queue_arguments(settings)))
    return plan
