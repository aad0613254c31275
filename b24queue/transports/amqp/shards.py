"""A fair queue's way in on RabbitMQ (docs/fairness.md): its consistent-hash exchange bound to the
events exchange for the consumer's events, and its shard queues behind it (`layout`).

Turning `fair_share` on binds the new way before the consumer queue's own bindings go, and
turning it off binds the consumer queue before the exchange's bindings go: an event published
meanwhile reaches the consumer once or (in that moment) twice, never not at all. Events already
in the queue left behind stay there and are drained: a fair worker consumes the consumer queue
too (retries and replays come back to it), and a worker with `fair_share` off consumes the
shards a fair one left.
"""

from __future__ import annotations

import logging

import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from b24queue.errors import ConfigError
from b24queue.queues import QueueSpec
from b24queue.transports.amqp import layout

log = logging.getLogger(__name__)

PLUGIN = "rabbitmq_consistent_hash_exchange"


def missing_plugin(owner: str, detail: str) -> ConfigError:
    return ConfigError(
        f"{owner}.fair_share: RabbitMQ has no consistent-hash exchange ({detail}); enable it on "
        f"every node (rabbitmq-plugins enable {PLUGIN}) or set fair_share = False"
    )


async def declare_fair_exchange(
    channel: AbstractChannel, spec: QueueSpec, owner: str
) -> AbstractExchange:
    try:
        return await channel.declare_exchange(
            layout.fair_exchange(spec),
            layout.FAIR_EXCHANGE_TYPE,
            durable=True,
            arguments=layout.fair_exchange_arguments(),
        )
    except aiormq.exceptions.ConnectionCommandInvalid as exc:
        # RabbitMQ closes the whole connection for an exchange type it does not know.
        detail = str(exc.args[0] if exc.args else exc)
        if "exchange type" not in detail:
            raise
        raise missing_plugin(owner, detail) from None


async def enter(
    channel: AbstractChannel,
    spec: QueueSpec,
    events: AbstractExchange,
    queue: AbstractQueue,
    shards: list[AbstractQueue],
    owner: str,
) -> None:
    """Feed the shards (declared) from `events`, then unbind the consumer queue."""
    fair = await declare_fair_exchange(channel, spec, owner)
    for shard in shards:  # in order: a shard's bucket is its place among the bindings
        await shard.bind(fair, routing_key=layout.SHARD_WEIGHT)
    for key in spec.bindings:
        await fair.bind(events, routing_key=key)
    for key in spec.bindings:
        await queue.unbind(events, routing_key=key)


async def left_behind(channel: AbstractChannel, spec: QueueSpec) -> bool:
    """Whether a fair worker made this queue's shards (its exchange exists), asked on a bare
    channel of the same connection: a missing exchange closes the channel that asks."""
    underlay = await channel.get_underlay_channel()
    probe = await underlay.connection.channel()
    try:
        await probe.exchange_declare(layout.fair_exchange(spec), passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    await probe.close()
    return True


async def leave(channel: AbstractChannel, spec: QueueSpec, events: str) -> None:
    """The consumer queue is bound again (first): the fair exchange stops taking its events. The
    shards stay, and are drained by whoever consumes the queue."""
    underlay = await channel.get_underlay_channel()
    for key in spec.bindings:
        await underlay.exchange_unbind(
            destination=layout.fair_exchange(spec), source=events, routing_key=key
        )
    log.info(
        "queue %s: fair_share off, its events are bound to it again; %s is no longer fed "
        "(its shards %s..%s are drained, then may be deleted)",
        spec.name,
        layout.fair_exchange(spec),
        layout.shards(spec)[0],
        layout.shards(spec)[-1],
    )
