"""Workers against the real RabbitMQ: acks, retries through the retry queues, the DLQ, prefetch."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from datetime import datetime
from typing import Any

import pytest

from b24queue import Event, EventConsumer, Reject
from b24queue import _constants as c
from b24queue.worker import Worker
from tests.support.consumers import Handle, consumer
from tests.support.rabbitmq import Broker, running_ingress
from tests.support.samples import SAMPLE_NAMES, sample_form, sample_published
from tests.support.wait import wait_until

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
pytestmark = pytest.mark.broker


async def post_samples(broker: Broker, names: list[str]) -> dict[str, str]:
    """Post samples through the real ingress; returns message_id -> sample name."""
    ids = {}
    async with running_ingress(broker.settings) as (client, _):
        for name in names:
            resp = await client.post("/b24/events", data=sample_form(name), headers=FORM)
            assert resp.status == 200
            ids[(await resp.json())["message_id"]] = name
    return ids


async def test_end_to_end_every_sample_is_handled_once_by_the_right_consumers(
    broker: Broker,
) -> None:
    deals: Counter[str] = Counter()
    everything: Counter[str] = Counter()

    async def on_deal(self: EventConsumer, event: Event) -> None:
        deals[event.message_id or ""] += 1

    async def on_any(self: EventConsumer, event: Event) -> None:
        assert event.payload == sample_published(names[event.message_id or ""])
        everything[event.message_id or ""] += 1

    classes = [
        consumer(broker.name("deals"), ("ONCRMDEALADD", "ONCRMDEALUPDATE"), on_deal),
        consumer(broker.name("all"), ("#",), on_any),
    ]
    async with Worker(broker.settings, classes):
        names = await post_samples(broker, SAMPLE_NAMES)
        await wait_until(lambda: len(everything) == len(SAMPLE_NAMES), what="all handled")
        deal_ids = {m for m, n in names.items() if n.startswith("crm-deal")}
        await wait_until(lambda: set(deals) == deal_ids, what="deals handled")
    assert set(everything.values()) == {1}
    assert set(deals.values()) == {1}
    for cls in classes:
        assert await broker.depth(cls.queue) == 0
        assert await broker.depth(cls.queue + ".dlq") == 0
    assert await broker.depth(broker.settings.unrouted) == 0


async def test_fails_twice_then_succeeds_after_the_configured_delays(broker: Broker) -> None:
    arrivals: list[tuple[int, float]] = []
    delays = (0.4, 0.8)
    done = asyncio.Event()

    async def flaky(self: EventConsumer, event: Event) -> None:
        arrivals.append((event.attempt, time.time()))
        if event.attempt < 3:
            raise RuntimeError(f"attempt {event.attempt} fails")
        done.set()

    cls = consumer(broker.name("flaky"), ("ONCRMDEALADD",), flaky, retry_delays_s=delays)
    async with Worker(broker.settings, [cls]):
        await post_samples(broker, ["crm-deal-add"])
        await asyncio.wait_for(done.wait(), timeout=20)
    assert [attempt for attempt, _ in arrivals] == [1, 2, 3]
    # Each retry waited at least its delay (the handler fails within a millisecond of arriving,
    # so arrival to arrival is failure to redelivery), and not absurdly longer.
    gaps = [t2 - t1 for (_, t1), (_, t2) in itertools.pairwise(arrivals)]
    for gap, delay in zip(gaps, delays, strict=True):
        assert delay - 0.02 <= gap < delay + 3, (gaps, delays)
    q = cls.queue
    for name in (q, f"{q}.retry.400ms", f"{q}.retry.800ms", f"{q}.dlq"):
        assert await broker.depth(name) == 0, name


async def test_always_failing_ends_in_the_dlq_with_error_headers(broker: Broker) -> None:
    attempts: list[int] = []

    async def broken(self: EventConsumer, event: Event) -> None:
        attempts.append(event.attempt)
        raise ValueError(f"cannot sync deal (token {event.auth.access_token})")

    cls = consumer(
        broker.name("broken"),
        ("ONCRMDEALADD",),
        broken,
        max_attempts=3,
        retry_delays_s=(0.1, 0.2),
    )
    async with Worker(broker.settings, [cls]):
        [message_id] = await post_samples(broker, ["crm-deal-add"])
        [dead] = await broker.take(f"{cls.queue}.dlq", 1)
    assert attempts == [1, 2, 3]
    assert dead.message_id == message_id
    assert json.loads(dead.body) == sample_published("crm-deal-add")
    assert dead.delivery_mode == 2
    assert dead.type == "ONCRMDEALADD"
    assert dead.app_id == "b24queue"
    h = dead.headers
    assert h[c.H_ATTEMPT] == 3
    assert h[c.H_DEAD_LETTER_REASON] == "max_attempts"
    assert h[c.H_ERROR_TYPE] == "ValueError"
    # The body leaves the event's OAuth tokens out: the handler had none to quote.
    assert h[c.H_ERROR_MESSAGE] == "cannot sync deal (token None)"
    assert h[c.H_ORIGINAL_QUEUE] == cls.queue
    assert h[c.H_ORIGINAL_ROUTING_KEY] == "ONCRMDEALADD"
    assert h["x-b24-domain"] == "acme.bitrix24.com"
    first = datetime.fromisoformat(str(h[c.H_FIRST_FAILED_AT]))
    last = datetime.fromisoformat(str(h[c.H_LAST_FAILED_AT]))
    assert 0.25 <= (last - first).total_seconds() < 5
    assert not any(k.startswith("x-death") for k in h)
    assert await broker.depth(cls.queue) == 0


async def test_reject_goes_straight_to_the_dlq(broker: Broker) -> None:
    attempts: list[int] = []

    async def rejecting(self: EventConsumer, event: Event) -> None:
        attempts.append(event.attempt)
        raise Reject("deal 1187 does not exist")

    cls = consumer(broker.name("rejecting"), ("ONCRMDEALADD",), rejecting)
    async with Worker(broker.settings, [cls]):
        await post_samples(broker, ["crm-deal-add"])
        [dead] = await broker.take(f"{cls.queue}.dlq", 1)
    assert attempts == [1]
    assert dead.headers[c.H_DEAD_LETTER_REASON] == "rejected"
    assert dead.headers[c.H_ERROR_MESSAGE] == "deal 1187 does not exist"


async def test_undecodable_bodies_go_to_the_dlq_at_once(broker: Broker) -> None:
    called: list[Event] = []

    async def handle(self: EventConsumer, event: Event) -> None:
        called.append(event)

    cls = consumer(broker.name("strict"), ("ONX",), handle)
    async with Worker(broker.settings, [cls]):
        await broker.publish_raw(cls.queue, b"\x00not json", message_id="garbage-1")
        await broker.publish_raw(cls.queue, b'{"event": "no..dots"}', message_id="garbage-2")
        dead = await broker.take(f"{cls.queue}.dlq", 2)
    assert called == []
    assert {d.message_id for d in dead} == {"garbage-1", "garbage-2"}
    assert {d.headers[c.H_DEAD_LETTER_REASON] for d in dead} == {"undecodable"}
    assert {d.body for d in dead} == {b"\x00not json", b'{"event": "no..dots"}'}


async def test_two_consumers_each_get_the_event_and_a_retry_stays_with_its_consumer(
    broker: Broker,
) -> None:
    a_attempts: list[int] = []
    b_seen: list[str] = []
    a_done = asyncio.Event()

    async def a(self: EventConsumer, event: Event) -> None:
        a_attempts.append(event.attempt)
        if event.attempt == 1:
            raise RuntimeError("first try fails")
        a_done.set()

    async def b(self: EventConsumer, event: Event) -> None:
        b_seen.append(event.message_id or "")

    ca = consumer(broker.name("a"), ("ONCRMDEALADD",), a, retry_delays_s=(0.2,))
    cb = consumer(broker.name("b"), ("ONCRMDEALADD",), b)
    async with Worker(broker.settings, [ca, cb]):
        [message_id] = await post_samples(broker, ["crm-deal-add"])
        await asyncio.wait_for(a_done.wait(), timeout=15)
        await wait_until(lambda: len(b_seen) >= 1, what="b handled")
    assert a_attempts == [1, 2]
    assert b_seen == [message_id]  # b never saw a's retry
    assert await broker.depth(cb.queue) == 0


@pytest.mark.parametrize("fair", [False, True], ids=["one-queue", "fair"])
async def test_prefetch_bounds_handlers_in_flight(broker: Broker, fair: bool) -> None:
    prefetch = 3
    in_flight = 0
    peak = 0
    release = asyncio.Event()
    handled: list[str] = []

    async def blocking(self: EventConsumer, event: Event) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await release.wait()
        finally:
            in_flight -= 1
        handled.append(event.message_id or "")

    cls = consumer(
        broker.name("blocking"), ("ONCRMDEALADD",), blocking, prefetch=prefetch, fair_share=fair
    )
    async with Worker(broker.settings, [cls]) as worker:
        await post_samples(broker, ["crm-deal-add"] * (3 * prefetch))
        await wait_until(lambda: in_flight == prefetch, what="prefetch handlers in flight")
        # One queue: the broker holds the rest back, exactly `prefetch` unacked, the others
        # ready. A fair one: the worker holds them, waiting for a slot (docs/fairness.md).
        await wait_until(
            lambda: _ready_is(broker, cls.queue, 0 if fair else 2 * prefetch),
            what="the rest waits",
        )
        await asyncio.sleep(0.2)
        assert in_flight == prefetch
        assert worker.runners[0].in_flight == prefetch
        release.set()
        await wait_until(lambda: len(handled) == 3 * prefetch, what="all handled")
    assert peak == prefetch
    assert await broker.depth(cls.queue) == 0


async def _ready_is(broker: Broker, queue: str, count: int) -> bool:
    return await broker.depth(queue) == count


async def test_redeclaring_is_idempotent_and_a_mismatch_names_queue_and_argument(
    broker: Broker,
) -> None:
    async def handle(self: EventConsumer, event: Event) -> None:
        return None

    cls = consumer(broker.name("same"), ("ONX",), handle)
    async with Worker(broker.settings, [cls]):
        pass
    async with Worker(broker.settings, [cls]):
        pass
    classic = broker.make_settings(queue_type="classic")
    from b24queue.errors import TopologyMismatchError

    with pytest.raises(TopologyMismatchError) as info:
        async with Worker(classic, [cls]):
            pass
    assert "x-queue-type" in str(info.value)
    assert repr(broker.settings.unrouted) in str(info.value) or cls.queue in str(info.value)


async def test_catalog_events_with_dots_route_by_exact_name_and_topic_patterns(
    broker: Broker,
) -> None:
    """Catalog events are named with dots; each part is a routing-key word."""
    got: dict[str, set[str]] = {"all": set(), "products": set(), "price": set(), "deal": set()}

    def recorder(key: str) -> Handle:
        async def handle(self: EventConsumer, event: Event) -> None:
            got[key].add(event.name)

        return handle

    classes = [
        consumer(broker.name("catalog-all"), ("catalog.#",), recorder("all")),
        consumer(broker.name("catalog-products"), ("CATALOG.PRODUCT.ON.*",), recorder("products")),
        consumer(broker.name("catalog-price"), ("CATALOG.PRICE.ON.UPDATE",), recorder("price")),
        consumer(broker.name("deals"), ("ONCRMDEALADD",), recorder("deal")),
    ]
    names = ["catalog-product-add", "catalog-price-update", "crm-deal-add"]
    async with Worker(broker.settings, classes):
        await post_samples(broker, names)
        await wait_until(lambda: sum(len(v) for v in got.values()) == 5, what="all routed")
    assert got == {
        "all": {"CATALOG.PRODUCT.ON.ADD", "CATALOG.PRICE.ON.UPDATE"},
        "products": {"CATALOG.PRODUCT.ON.ADD"},
        "price": {"CATALOG.PRICE.ON.UPDATE"},
        "deal": {"ONCRMDEALADD"},
    }
    assert await broker.depth(broker.settings.unrouted) == 0


async def test_a_spooled_event_keeps_when_it_was_accepted(broker: Broker, tmp_path: Any) -> None:
    """Spooled events can reach handlers after newer ones: `accepted_at` (the message timestamp,
    kept through the spool) and `ts` (the portal's) let a handler order them."""
    from dataclasses import replace
    from datetime import UTC, timedelta

    from b24queue.events.envelope import envelope_for
    from b24queue.ingress.fallback import SpoolingSink
    from b24queue.ingress.spool import Spool
    from b24queue.testing import make_event
    from b24queue.transports.amqp.publisher import AmqpPublisher

    earlier = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    old = replace(
        envelope_for(make_event("ONCRMDEALADD", {"FIELDS": {"ID": "1"}})), timestamp=earlier
    )
    async with Spool(tmp_path / "spool.sqlite3", 10) as spool:
        await spool.put(old)  # accepted five minutes ago, while RabbitMQ was away
    seen: dict[str, Event] = {}

    async def handle(self: EventConsumer, event: Event) -> None:
        seen[event.message_id or ""] = event

    cls = consumer(broker.name("ordered"), ("ONCRMDEALADD",), handle)
    async with Worker(broker.settings, [cls]):
        [new_id] = await post_samples(broker, ["crm-deal-add"])  # accepted now, handled first
        await wait_until(lambda: new_id in seen, what="the new event")
        async with (
            AmqpPublisher(broker.settings, f"b24queue test {broker.prefix}") as publisher,
            Spool(tmp_path / "spool.sqlite3", 10) as spool,
            SpoolingSink(publisher, spool, bypass_s=1, retry_interval_s=0.1),
        ):
            await wait_until(lambda: old.message_id in seen, what="the spooled event")
    assert seen[old.message_id].accepted_at == earlier
    newer = seen[new_id].accepted_at
    assert newer is not None and newer > earlier
