"""Fair claims on Redis (b24queue.transports.redis_streams.fair): what they keep beside the stream
goes when a portal is gone, entries parked in no list are found again, and `status` counts the
portals waiting, parked or not."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from b24queue import EventConsumer
from b24queue.events.envelope import envelope_for
from b24queue.queues import QueueSpec, spec_for
from b24queue.settings import Settings, load_settings
from b24queue.testing import make_event
from b24queue.transports.kit.leased import Row
from b24queue.transports.redis_streams.connection import connect
from b24queue.transports.redis_streams.store import Store
from tests.support.redis_server import RedisServer
from tests.support.samples import SAMPLE_TOKEN


@pytest.fixture
def queue(redis_aof: RedisServer) -> Iterator[Settings]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    yield load_settings(
        broker_url=redis_aof.url,
        redis_prefix=prefix,
        app_tokens=SAMPLE_TOKEN,
        unrouted=f"{prefix}.unrouted",
        publish_timeout_s=3.0,
    )


@pytest.fixture
async def store(queue: Settings) -> AsyncIterator[Store]:
    store = Store(connect(queue, "test"), queue)
    try:
        yield store
    finally:
        await store.client.aclose()


def fair_spec(name: str = "fq.q", **attrs: Any) -> QueueSpec:
    async def handle(self: EventConsumer, event: object) -> None:
        return None

    attrs = {"queue": name, "events": ("#",), "handle": handle, **attrs}
    return spec_for(type("F", (EventConsumer,), attrs))


async def publish(store: Store, portal: str, n: int) -> None:
    await store.publish(
        [envelope_for(make_event("ONCRMDEALADD", member_id=portal)) for _ in range(n)]
    )


async def drain(store: Store, spec: QueueSpec, count: int = 5) -> list[Row]:
    """Claim and ack until a claim gives nothing; what was given, in order."""
    given: list[Row] = []
    while rows := await store.claim(spec.name, "w", count, 60.0, spec.fairness):
        given += rows
        assert await store.ack(spec.name, [(r, "w") for r in rows]) == [True] * len(rows)
    return given


async def keys(store: Store, spec: QueueSpec, pattern: str) -> list[str]:
    found = [k async for k in store.client.scan_iter(match=store.stream(spec.name) + pattern)]
    return sorted(k.decode() for k in found)


async def test_a_portal_gone_leaves_no_pass_and_no_held_set(store: Store) -> None:
    """Thirty portals come once each (a cap: each gets a held set, and a pass as it empties);
    once the clock has gone past their passes (other portals' turns) and their held sets have
    been swept, nothing of theirs is left: what is kept grows with the portals active, not with
    every portal ever seen."""
    spec = fair_spec(max_in_flight_per_portal=1)
    await store.declare(spec)
    for i in range(30):
        await publish(store, f"p{i:02d}".ljust(32, "0"), 1)
    assert len(await drain(store, spec)) == 30
    # Another portal's turns move the clock past their passes; its claims sweep the held sets
    # (of portals not given a slot for a second: two a claim).
    await asyncio.sleep(1.1)
    await publish(store, "z" * 32, 40)
    assert len(await drain(store, spec, 1)) == 40
    await asyncio.sleep(1.1)
    await store.claim(spec.name, "w", 1, 60.0, spec.fairness)
    assert await keys(store, spec, ":held:*") == []
    assert await store.client.zcard(store.stream(spec.name) + ":holding") == 0
    passes = await store.client.zrange(store.stream(spec.name) + ":passes", 0, -1)
    assert passes == [b"z" * 32], passes  # its own, past the clock: the last portal to empty
    assert await keys(store, spec, ":fair:*") == []
    assert await store.client.zcard(store.stream(spec.name) + ":ready") == 0


async def test_what_a_version_before_kept_is_swept(store: Store) -> None:
    """Before, the passes were a hash of every portal that ever emptied, beside a held set each
    (with a cap) that nothing pruned: the first claim turns them into portals to sweep."""
    spec = fair_spec(max_in_flight_per_portal=2)
    await store.declare(spec)
    stream = store.stream(spec.name)
    old = {f"old{i:02d}": str(i) for i in range(6)}
    await store.client.hset(stream + ":passes", mapping=old)
    for portal in old:
        await store.client.sadd(f"{stream}:held:{portal}", "1-1", "2-1")  # long acked
    await publish(store, "a" * 32, 3)
    given = await drain(store, spec, 1)
    assert len(given) == 3
    await asyncio.sleep(1.1)
    for _ in range(3):
        await store.claim(spec.name, "w", 1, 60.0, spec.fairness)
    assert await store.client.type(stream + ":passes") in (b"zset", b"none")
    assert await keys(store, spec, ":held:*") == []


async def forget_fair_keys(store: Store, spec: QueueSpec, *patterns: str) -> int:
    gone = [k for p in patterns for k in await keys(store, spec, p)]
    return int(await store.client.delete(*gone)) if gone else 0


async def test_entries_parked_in_no_list_are_found_again(store: Store) -> None:
    """The fair keys lost with entries parked (deleted here; or a Redis restarted from a copy
    that had the stream but not them): fair claims alone would never give them. A runner's
    start reconciles: each is added again, and every event is handled once."""
    from b24queue.transports.redis_streams.runner import RedisLeases, Waker

    spec = fair_spec()
    await store.declare(spec)
    for portal, n in (("a" * 32, 30), ("b" * 32, 5), ("c" * 32, 1)):
        await publish(store, portal, n)
    first = await store.claim(spec.name, "w", 2, 60.0, spec.fairness)  # parks all 36
    assert len(first) == 2
    assert await forget_fair_keys(store, spec, ":fair:*", ":ready", ":clock", ":passes") >= 4
    assert await store.claim(spec.name, "w", 5, 60.0, spec.fairness) == []  # stranded

    leases = RedisLeases(store.settings, store, Waker(store.settings, store))
    try:
        await leases.declare(spec)  # a runner starting: one full pass, in steps
    finally:
        await leases.close()
    rest = await drain(store, spec)
    ids = [r.message_id for r in first + rest]
    assert len(ids) == len(set(ids)) == 36
    # Nothing left to find; the two given first are still theirs.
    assert await store.reconcile(spec.name) == (0, True)
    assert await store.ack(spec.name, [(r, "w") for r in first]) == [True, True]
    assert await store.count(spec.name) == 0


async def test_a_running_worker_finds_entries_parked_in_no_list(store: Store) -> None:
    """Fair keys lost while a worker runs: its periodic check sees the parking consumer hold
    more entries than the lists, and looks for them in the background; nothing is stranded."""
    from b24queue.transports.redis_streams.runner import RedisLeases, Waker

    spec = fair_spec()
    await store.declare(spec)
    await publish(store, "a" * 32, 8)
    await publish(store, "b" * 32, 4)
    leases = RedisLeases(store.settings, store, Waker(store.settings, store))
    try:
        await leases.declare(spec)
        first = await store.claim(spec.name, "w", 1, 60.0, spec.fairness)  # parks the 12
        assert not await store.parked_unlisted(spec.name)
        await forget_fair_keys(store, spec, ":fair:*", ":ready")
        assert await store.parked_unlisted(spec.name)
        await leases.beat("w", spec.name, "test", [first[0].id], 60.0)  # not due yet
        assert not leases._mending
        leases._mend_at[spec.name] = 0.0
        await leases.beat("w", spec.name, "test", [first[0].id], 60.0)
        await leases._mending[spec.name]
    finally:
        await leases.close()
    assert not await store.parked_unlisted(spec.name)
    rest = await drain(store, spec)
    assert len({r.message_id for r in first + rest}) == len(first + rest) == 12


async def test_reconcile_goes_in_bounded_steps_and_mends_the_turns(store: Store) -> None:
    """Each step looks at a bounded number of parked entries from where the last stopped. A
    portal whose list is there but out of the turns (`:ready` lost) is put back in them, its
    entries where they were; a portal's list lost while more of its entries were parked anew:
    those older than the new list's head are added again."""
    spec = fair_spec()
    await store.declare(spec)
    a, b = "a" * 32, "b" * 32
    await publish(store, a, 7)
    await publish(store, b, 3)
    assert len(await store.claim(spec.name, "w", 1, 60.0, spec.fairness)) == 1
    await forget_fair_keys(store, spec, ":ready")
    assert await store.claim(spec.name, "w", 1, 60.0, spec.fairness) == []
    steps = []
    while True:
        added, finished = await store.reconcile(spec.name, at_most=4)  # (200 at most at once)
        steps.append(added)
        if finished:
            break
    assert steps == [0, 0, 0]  # 9 parked: 4 + 4 + 1
    given = await store.claim(spec.name, "w", 2, 60.0, spec.fairness)
    # In turns again (both back at the clock: their starts were lost with `:ready`).
    assert [r.headers["x-b24-member-id"] for r in given] == [a, b]
    await forget_fair_keys(store, spec, ":fair:" + a)  # a's 5 waiting
    await publish(store, a, 2)
    await store.claim(spec.name, "w", 0, 60.0, spec.fairness)  # parks the two in a new list
    assert await store.reconcile(spec.name) == (5, True)
    rest = await drain(store, spec)
    assert sorted(r.headers["x-b24-member-id"] for r in rest) == [a] * 7 + [b] * 2


async def test_status_counts_the_portals_parked_and_not_yet_parked(store: Store) -> None:
    spec = fair_spec()
    await store.declare(spec)
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    await publish(store, a, 5)
    await publish(store, b, 3)
    [given] = await store.claim(spec.name, "w", 1, 60.0, spec.fairness)  # parks these 8
    await publish(store, c, 2)  # not parked yet
    assert await store.move(given, "w", queue=spec.name, headers=given.headers, delay_s=60)
    view = await store.overview(60.0)
    waiting = view.portals[spec.name]
    assert (waiting.count, waiting.more) == (3, False)
    assert [(p.portal, p.waiting) for p in waiting.top] == [(a, 5), (b, 3), (c, 2)]


async def test_status_counts_a_first_in_first_out_queues_portals(store: Store) -> None:
    spec = fair_spec("fifo.q", fair_share=False)
    await store.declare(spec)
    await publish(store, "a" * 32, 4)
    await publish(store, "b" * 32, 2)
    assert len(await store.claim(spec.name, "w", 3, 60.0)) == 3  # a handler's: not waiting
    waiting = (await store.overview(60.0)).portals[spec.name]
    assert [(p.portal, p.waiting) for p in waiting.top] == [("b" * 32, 2), ("a" * 32, 1)]
