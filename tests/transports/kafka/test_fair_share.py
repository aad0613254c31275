"""The fair share on Kafka across worker processes' group members (docs/fairness.md): a
portal's events and its retries are in partitions of one number, which the range assignor gives
to one member, so `max_in_flight_per_portal` held in each member holds for the queue. Two
workers in this process (two members of the queue's group), on the tests' 3 partitions, where
the round robin assignor would split every events partition from its retry partition."""

from __future__ import annotations

import asyncio
from collections import Counter

from b24queue import Event, EventConsumer, Retry
from b24queue.worker import Worker
from tests.conformance.fairness import FLOOD, envelope, publish
from tests.support.bench import Bench
from tests.support.consumers import consumer
from tests.support.wait import wait_until

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
