"""The fair share on Kafka across worker processes' group members (docs/fairness.md): a
portal's events and its retries are in partitions of one number, which the range assignor gives
to one member, so `max_in_flight_per_portal` held in each member holds for the queue. Two
workers in this process (two members of the queue's group), on the tests' 3 partitions, where
the round robin assignor would split every events partition from its retry partition."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest
from aiokafka import AIOKafkaProducer

from b24queue import Event, EventConsumer, Retry
from b24queue.events.envelope import Envelope
from b24queue.transports.kafka.client import key_of
from b24queue.worker import Worker
from tests.conformance.fairness import FLOOD, envelope, publish
from tests.support.bench import Bench
from tests.support.consumers import consumer
from tests.support.wait import wait_until

# 8-9 s each (consumer groups, a rebalance): make faults runs them (make test's ten minutes).
pytestmark = pytest.mark.long

# Portals in partitions 0 and 1 of 3 (the flood's is 2): both members have work.
OTHERS = ("portal3" + "0" * 25, "portal1" + "0" * 25)


async def test_a_portals_events_and_retries_go_to_one_member_and_its_cap_holds(
    bench: Bench,
) -> None:
    running: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    handled_by: dict[str, set[int]] = {}
    handled: list[tuple[str, int]] = []

    async def handle(self: EventConsumer, event: Event) -> None:
        member = event.auth.member_id or ""
        handled_by.setdefault(member, set()).add(id(self))
        running[member] += 1
        peak[member] = max(peak[member], running[member])
        try:
            await asyncio.sleep(0.01)
            handled.append((member, event.attempt))
            if event.attempt == 1:
                raise Retry(delay_s=0.5)  # every event once through the retry topic
        finally:
            running[member] -= 1

    cls = consumer(
        bench.name("capped"),
        ("ONCRMDEALADD",),
        handle,
        prefetch=4,
        max_in_flight_per_portal=1,
        retry_delays_s=(0.5,),
    )
    await bench.transport.declare([cls])

    async def two_members() -> bool:
        status = await bench.transport.status()
        return any(q.queue == cls.queue and q.consumers == 2 for q in status.queues)

    async with Worker(bench.settings, [cls]), Worker(bench.settings, [cls]):
        await wait_until(two_members, 60, "two members in the group")
        await publish(bench, envelope(FLOOD, 30) + envelope(OTHERS[0], 5) + envelope(OTHERS[1], 5))
        await wait_until(lambda: len(handled) == 80, 60, "every event handled twice")
    assert Counter(m for m, _ in handled) == {FLOOD: 60, OTHERS[0]: 10, OTHERS[1]: 10}
    # Each portal's events and retries were handled by one member, never two at once.
    assert all(len(members) == 1 for members in handled_by.values()), handled_by
    assert len(set().union(*handled_by.values())) == 2  # both members had partitions
    assert peak == {FLOOD: 1, OTHERS[0]: 1, OTHERS[1]: 1}, peak


async def test_records_an_earlier_version_wrote_without_a_key_are_all_handled(
    bench: Bench,
) -> None:
    """The upgrade with events waiting: an event without a member_id had a null key (spread over
    the partitions); now it is keyed "" (one partition). Both kinds, waiting in the topic, are
    handled, each once, one group of their own beside a keyed flood."""
    seen: list[str] = []

    async def handle(self: EventConsumer, event: Event) -> None:
        seen.append(event.message_id or "")

    cls = consumer(bench.name("old"), ("ONCRMDEALADD",), handle, prefetch=4)
    await bench.transport.declare([cls])
    body = b'{"event": "ONCRMDEALADD", "data": {}}'
    old = [uuid.uuid4().hex for _ in range(6)]
    sender = AIOKafkaProducer(bootstrap_servers=bench.settings.kafka_bootstrap, acks="all")
    await sender.start()
    try:
        for i, message_id in enumerate(old):
            headers = [
                ("m", message_id.encode()),
                ("k", b"ONCRMDEALADD"),
                ("e", b"ONCRMDEALADD"),
                ("t", b"2026-01-01T00:00:00+00:00"),
                ("h", b"{}"),
                ("to", cls.queue.encode()),
            ]
            events = bench.settings.exchange
            await sender.send_and_wait(events, body, key=None, partition=i % 3, headers=headers)
    finally:
        await sender.stop()
    keyless = [
        Envelope(e.message_id, e.routing_key, e.body, {}, e.timestamp, e.event_type)
        for e in envelope(FLOOD, 3)
    ]
    assert key_of(keyless[0].headers) == b""
    await publish(bench, envelope(FLOOD, 20) + keyless)
    async with Worker(bench.settings, [cls]):
        await wait_until(lambda: len(seen) >= 29, 30, "every event handled")
        await asyncio.sleep(1)  # none twice
    assert set(old) | {e.message_id for e in keyless} <= set(seen)
    assert len(seen) == len(set(seen)) == 29
