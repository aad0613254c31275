"""RabbitMQ behind the transport seam (`b24queue.transports`): the reference transport."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from b24queue.consumer import EventConsumer
from b24queue.errors import ConfigError, ManagementError
from b24queue.queues import BindingChange, DeclaredExchange, DeclaredQueue, QueueSpec, spec_for
from b24queue.settings import Settings
from b24queue.telemetry.metrics import WorkerMetrics
from b24queue.transports import Runner, connection_name, worker_connection_name
from b24queue.transports.amqp import bindings, internals
from b24queue.transports.amqp.connection import close_quietly, connect
from b24queue.transports.amqp.definitions import definitions
from b24queue.transports.amqp.dlq import DeadLetterTool
from b24queue.transports.amqp.layout import (
    exchanges,
    queue_arguments,
    queue_plan,
    queue_policies,
    unrouted_policy,
)
from b24queue.transports.amqp.management import ManagementClient
from b24queue.transports.amqp.publisher import AmqpPublisher
from b24queue.transports.amqp.runner import ConsumerRunner
from b24queue.transports.amqp.status import summarize
from b24queue.transports.amqp.topology import (
    declare_consumer_queues,
    declare_exchanges,
    inspect_queue,
)
from b24queue.transports.status import Status

log = logging.getLogger(__name__)


class AmqpWorkers:
    """A worker process's named connection; each consumer on a channel of its own."""

    def __init__(self, settings: Settings, connection: AbstractRobustConnection) -> None:
        self._settings = settings
        self._connection = connection

    def runner(self, consumer: EventConsumer, metrics: WorkerMetrics | None) -> ConsumerRunner:
        return ConsumerRunner(consumer, self._settings, self._connection, metrics)

    async def started(self, runners: Sequence[Runner]) -> None:
        declared = [(r.spec, r.queue) for r in runners if isinstance(r, ConsumerRunner)]
        await bindings.prune(self._settings, declared, required=False)

    async def close(self) -> None:
        await close_quietly(self._connection)


class Amqp:
    name = "amqp"
    needs_spool = True
    # Fair queues: shard queues fed by a consistent-hash exchange, slots in turn by portal in
    # each worker (`shards`, `runner`); the per-portal cap is not offered.
    shares_by_portal = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def publisher(self, connection_name: str) -> AmqpPublisher:
        internals.warn_if_off(several_nodes=len(self.settings.amqp_urls) > 1)
        return AmqpPublisher(self.settings, connection_name)

    async def open_workers(self, classes: Sequence[type[EventConsumer]]) -> AmqpWorkers:
        internals.warn_if_off(several_nodes=len(self.settings.amqp_urls) > 1)
        await ensure_policies(self.settings, classes)
        connection = await connect(
            self.settings,
            worker_connection_name(classes),
            give_up_after_s=self.settings.connect_timeout_s,
        )
        return AmqpWorkers(self.settings, connection)

    async def declare(self, classes: Sequence[type[EventConsumer]]) -> list[DeclaredQueue]:
        """Exchanges, the unrouted queue, each consumer's queues, policies; stale bindings go."""
        settings = self.settings
        await ensure_policies(settings, classes, required=True)
        connection = await connect(
            settings, connection_name("topology"), give_up_after_s=settings.connect_timeout_s
        )
        try:
            channel = await connection.channel()
            await declare_exchanges(channel, settings)
            plan = [(settings.unrouted, queue_arguments(settings))]
            declared = []
            for cls in classes:
                spec = spec_for(cls)
                queues = await declare_consumer_queues(channel, settings, spec, cls.__name__)
                declared.append((spec, queues.queue))
                plan += queue_plan(settings, spec)
            await bindings.prune(settings, declared, required=True)
            states = [await inspect_queue(channel, name, args) for name, args in plan]
            await channel.close()
            return states
        finally:
            await close_quietly(connection)

    async def status(self) -> Status:
        client = ManagementClient(self.settings)
        queues, connections, bound = await asyncio.to_thread(
            lambda: (
                client.queues(),
                client.connections(),
                client.bound_queues(self.settings.exchange),
            )
        )
        return summarize(self.settings, queues, connections, bound)

    def exchanges(self) -> list[DeclaredExchange]:
        return exchanges(self.settings)

    def definitions(self, classes: Sequence[type[EventConsumer]]) -> dict[str, Any]:
        """The broker definitions (`rabbitmq/definitions.json`) a node boots from."""
        return definitions(self.settings, classes)

    async def plan_bindings(self, specs: Sequence[QueueSpec]) -> list[BindingChange]:
        return await bindings.plan(self.settings, specs)

    def dead_letters(self, queue: str) -> DeadLetterTool:
        return DeadLetterTool(self.settings, queue)


async def ensure_policies(
    settings: Settings, classes: Sequence[type[EventConsumer]], *, required: bool = False
) -> list[str]:
    """Create the unrouted queue's policy (its cap) and each consumer queue's (dead-lettering,
    delivery limit; its shards' too when it is fair) where they are missing.

    Best effort for a worker (a warning when the management API is unreachable: the queues work
    without it, only the delivery limit and the cap are missing); `required` for
    `b24queue topology`. Returns the names of the policies created.
    """
    client = ManagementClient(settings)
    created = []
    policies = [unrouted_policy(settings)]
    policies += [p for cls in classes for p in queue_policies(settings, spec_for(cls))]
    try:
        for policy in policies:
            if await asyncio.to_thread(client.ensure_policy, policy):
                log.info("created policy %s: %s", policy.name, policy.definition)
                created.append(policy.name)
    except (ManagementError, ConfigError) as exc:
        if required:
            raise
        log.warning(
            "could not check the queue policies (%s); without them a message that crashes the "
            "worker is redelivered without limit, and the unrouted queue has no cap. Run "
            "`b24queue topology` with management access.",
            exc,
        )
    return created


def transport(settings: Settings) -> Amqp:
    return Amqp(settings)
