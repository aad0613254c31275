"""The unrouted queue's cap (`B24QUEUE_UNROUTED_MAX_EVENTS`, `_MAX_BYTES`): past it the oldest
events go, and what went is counted (our metric; RabbitMQ's own on RabbitMQ). On the database and
Redis transports the cap is kept by a ledger of the unrouted queue: it must follow replays and
purges, and be counted once on a queue that had none (an upgrade).

RabbitMQ, SQLite, PostgreSQL and Redis run `UnroutedCapScenarios`; the three with a ledger run
`UnroutedLedgerScenarios` too. Kafka's cap is its topic's (Tansu enforces neither of Kafka's
means): tests/transports/kafka/test_unrouted_cap.py."""

from __future__ import annotations

import re

import aiohttp
import pytest

from b24queue import Event, EventConsumer
from b24queue.settings import Settings
from b24queue.transports import transport_for
from tests.support.bench import Bench
from tests.support.consumers import consumer
from tests.support.unrouted import (
    UNBOUND,
    body_size,
    dropped_metric,
    ingress,
    post_unbound,
    unrouted_ids,
)
from tests.support.wait import wait_until

RABBIT_DROPS = re.compile(
    r'^rabbitmq_global_messages_dead_lettered_maxlen_total\{queue_type="rabbit_quorum_queue",'
    r'dead_letter_strategy="disabled"\} (\S+)$',
    re.M,
)


async def rabbit_drops() -> float:
    """RabbitMQ's own count of messages dropped by a quorum queue's length limit (its
    Prometheus plugin; global: other queues' drops count too, so only ever compared upwards)."""
    async with aiohttp.ClientSession() as s, s.get("http://127.0.0.1:15692/metrics") as r:
        return float(RABBIT_DROPS.findall(await r.text())[0])


@pytest.mark.broker
class UnroutedCapScenarios:
    """Each capped transport's `TestUnroutedCapOn<Transport>` runs these on its own `bench`."""

    @pytest.mark.parametrize("cap", ["events", "bytes"])
    async def test_the_unrouted_queue_keeps_its_newest_within_the_cap(
        self, bench: Bench, cap: str
    ) -> None:
        size = body_size(UNBOUND)
        limits = {"unrouted_max_events": 3} if cap == "events" else {"unrouted_max_bytes": 3 * size}
        settings = bench.with_settings(**limits)
        await transport_for(settings).declare([])  # on RabbitMQ: the cap's policy, then the queue
        rabbit = await rabbit_drops() if settings.transport == "amqp" else 0.0
        async with ingress(settings) as client:
            ids = await post_unbound(client, 5)
            if settings.transport != "amqp":
                assert await dropped_metric(client) == 2
        assert await unrouted_ids(settings) == ids[2:]
        if settings.transport != "amqp":  # RabbitMQ's figures reach its API some seconds later
            problems = (await transport_for(settings).status()).problems
            assert any(p.startswith(f"{settings.unrouted} holds 3") for p in problems), problems
            assert any("its cap" in p for p in problems) == (cap == "events"), problems
        if settings.transport == "amqp":  # dropped by RabbitMQ, counted by RabbitMQ

            async def counted() -> bool:
                return await rabbit_drops() >= rabbit + 2

            await wait_until(counted, 10, "RabbitMQ counting the 2 dropped")


@pytest.mark.broker
class UnroutedLedgerScenarios:
    """Each transport with a ledger (`TestUnroutedLedgerOn<Transport>`) runs these on its own
    `bench`, and says how a queue from before the cap looks there (`forget_ledger`)."""

    async def forget_ledger(self, settings: Settings) -> None:
        """Make the unrouted queue look as one made by a b24queue before the cap: no ledger."""
        raise NotImplementedError

    @pytest.mark.parametrize("cap", ["events", "bytes"])
    async def test_the_cap_follows_purges_and_replays(self, bench: Bench, cap: str) -> None:
        """What an operator takes out of the unrouted queue makes room: the ledger follows."""
        size = body_size(UNBOUND)
        assert body_size("crm-deal-add") <= size  # the last three fit in either cap
        limits = {"unrouted_max_events": 3} if cap == "events" else {"unrouted_max_bytes": 3 * size}
        settings = bench.with_settings(**limits)
        async with ingress(settings) as client:
            await post_unbound(client, 3)
            async with transport_for(settings).dead_letters(settings.unrouted) as unrouted:
                assert await unrouted.purge(2) == 2
            kept = await post_unbound(client, 2)
            assert await dropped_metric(client) == 0
            assert (await unrouted_ids(settings))[-2:] == kept and len(kept) == 2

            # A consumer binds ONTASKADD: replayed, the three leave the unrouted queue.
            async def handle(self: EventConsumer, event: Event) -> None:
                return None

            bound = consumer(bench.name("tasks"), ("ONTASKADD",), handle)
            await transport_for(settings).declare([bound])
            async with transport_for(settings).dead_letters(settings.unrouted) as unrouted:
                assert await unrouted.replay() == (3, 3)
            # Another event nobody binds: three fit without a drop.
            more = await post_unbound(client, 3, "crm-deal-add")
            assert await dropped_metric(client) == 0
        assert await unrouted_ids(settings) == more

    async def test_a_queue_from_before_the_cap_is_counted_once(self, bench: Bench) -> None:
        size = body_size(UNBOUND)
        async with ingress(bench.settings) as client:  # the default cap: nothing dropped
            await post_unbound(client, 4)
        await self.forget_ledger(bench.settings)
        # The cap in bytes catches it only if the four already there were counted.
        settings = bench.with_settings(unrouted_max_bytes=3 * size)
        async with ingress(settings) as client:
            [last] = await post_unbound(client, 1)
            assert await dropped_metric(client) == 2
        assert (await unrouted_ids(settings))[-1] == last
        assert len(await unrouted_ids(settings)) == 3
