"""The scenarios every transport runs (tests/conformance), on Kafka (Tansu). The unrouted
topic's cap is Kafka's own: test_unrouted_cap.py."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka.partitioner import murmur2

from b24queue import Event, EventConsumer
from b24queue.worker import Worker
from tests.conformance.delivery import DeliveryScenarios
from tests.conformance.fairness import (
    FLOOD,
    QUIET,
    FairShareScenarios,
    FairShareUpgradeScenarios,
    envelope,
    publish,
)
from tests.conformance.processes import ProcessScenarios
from tests.conformance.publishing import PublishingScenarios
from tests.conformance.status import StatusScenarios
from tests.support.bench import Bench
from tests.support.consumers import consumer
from tests.support.kafka_server import KafkaServer, kafka_settings
from tests.support.wait import wait_until

# The fair share is between partitions (the publisher keys by portal): the scenarios' portals
# must land in partitions of their own, as they do among 12 (B24QUEUE_KAFKA_PARTITIONS's
# default; among the other tests' 3 they share one). NEXT_DOOR shares the flood's.
PARTITIONS = 12
NEXT_DOOR = "nextdoor36" + "0" * 22


def partition_of(member_id: str, partitions: int = PARTITIONS) -> int:
    """Where the publisher's key sends a portal's events (aiokafka's default partitioner)."""
    return int(murmur2(member_id.encode()) & 0x7FFFFFFF) % partitions


class TestDeliveryOnKafka(DeliveryScenarios):
    # 6-7 s on Kafka (a consumer group to join for the retry): long, run by make faults, keeping
    # make test within its ten minutes; every other transport runs it in make test.
    @pytest.mark.long
    async def test_a_robots_answer_rides_the_retry_copy(self, bench: Bench) -> None:
        await super().test_a_robots_answer_rides_the_retry_copy(bench)

    # 7-8 s each on Kafka: long too (every other transport runs them in make test).
    @pytest.mark.long
    async def test_reject_dead_letters_now_and_replay_and_purge(self, bench: Bench) -> None:
        await super().test_reject_dead_letters_now_and_replay_and_purge(bench)

    @pytest.mark.long
    async def test_status_reports_depth_and_dead_letters(self, bench: Bench) -> None:
        await super().test_status_reports_depth_and_dead_letters(bench)

    @pytest.mark.long
    async def test_topic_patterns_and_unrouted_kept(self, bench: Bench) -> None:
        await super().test_topic_patterns_and_unrouted_kept(bench)


# 6-7 s each on Kafka (a consumer group to join per consumer, two or three per scenario): marked
# long, they run in make faults, keeping make test within its ten minutes.
@pytest.mark.long
class TestPublishingOnKafka(PublishingScenarios):
    pass


class TestProcessesOnKafka(ProcessScenarios):
    pass


class TestStatusOnKafka(StatusScenarios):
    pass


class OnTwelvePartitions:
    @pytest.fixture
    def bench(self, tansu: KafkaServer) -> Bench:
        prefix = f"t{uuid.uuid4().hex[:10]}"
        return Bench(kafka_settings(tansu, prefix, kafka_partitions=PARTITIONS), prefix)


# Kafka's fair-share scenarios take 7-9 s each (a consumer group to join per worker): marked long,
# they run in make faults, keeping make test within its ten minutes.
@pytest.mark.long
class TestFairShareUpgradeOnKafka(OnTwelvePartitions, FairShareUpgradeScenarios):
    async def to_schema_2(self, bench: Bench) -> None:
        """Nothing to take back: the topics and records are as an earlier version made them
        (keyed by portal); the lanes are the worker's own. Records of events without a
        member_id it keyed null: test_fair_share.py."""


@pytest.mark.long
class TestFairShareOnKafka(OnTwelvePartitions, FairShareScenarios):
    def test_the_portals_land_in_partitions_of_their_own(self) -> None:
        """What the scenarios above rely on; NEXT_DOOR is the flood's neighbour below."""
        assert len({partition_of(p) for p in (FLOOD, *QUIET)}) == 3
        assert partition_of(NEXT_DOOR) == partition_of(FLOOD)

    async def test_off_it_is_first_in_first_out_across_portals(self, bench: Bench) -> None:
        """Kafka's order is per partition: off, a partition's records go in offset order and
        partitions as they are fetched (as before). A portal in the flood's partition waits for
        it, on or off (test_a_portal_sharing_the_floods_partition_waits_for_it)."""
        order: list[str] = []

        async def handle(self: EventConsumer, event: Event) -> None:
            order.append(event.auth.member_id or "")

        cls = consumer(bench.name("fifo"), ("ONCRMDEALADD",), handle, prefetch=4, fair_share=False)
        await bench.transport.declare([cls])
        await publish(bench, envelope(FLOOD, 300))
        await publish(bench, envelope(NEXT_DOOR, 5) + envelope(QUIET[0], 5))
        async with Worker(bench.settings, [cls]):
            await wait_until(lambda: len(order) == 310, 30, "all handled")
        assert [m for m in order if m != QUIET[0]] == [FLOOD] * 300 + [NEXT_DOOR] * 5

    async def test_a_portal_sharing_the_floods_partition_waits_for_it(self, bench: Bench) -> None:
        """The limit of the fair share on Kafka: portals that hash to one partition share its
        lane, in offset order; a portal of its own is served in turn beside it."""
        order: list[str] = []

        async def handle(self: EventConsumer, event: Event) -> None:
            order.append(event.auth.member_id or "")
            await asyncio.sleep(0.002)

        cls = consumer(bench.name("door"), ("ONCRMDEALADD",), handle, prefetch=4)
        await bench.transport.declare([cls])
        await publish(bench, envelope(FLOOD, 600))
        await publish(bench, envelope(NEXT_DOOR, 5) + envelope(QUIET[0], 5))
        async with Worker(bench.settings, [cls]):
            await wait_until(lambda: len(order) == 610, 60, "all handled")
        door = [i for i, m in enumerate(order) if m == NEXT_DOOR]
        quiet = [i for i, m in enumerate(order) if m == QUIET[0]]
        assert min(door) > 600, door  # behind the whole flood
        assert max(quiet) < 20, quiet  # in turn with it
