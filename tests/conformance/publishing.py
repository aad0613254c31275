"""The app's own messages (b24queue.publishing): published from a handler (released on its ack
only) and from a `Producer`, routed like events, the same on every transport (each runs them:
tests/transports/<name>/test_conformance.py)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from b24queue import Event, EventConsumer, Producer, Retry
from b24queue.events.envelope import token_digest
from b24queue.events.event import token_digest_of
from b24queue.idempotency import MemorySeenStore
from b24queue.publishing import derived_id
from b24queue.testing import make_event
from b24queue.worker import Worker
from tests.conformance.processes import StopsWorkers, records, start_worker
from tests.support.bench import Bench
from tests.support.consumers import consumer
from tests.support.samples import SAMPLE_TOKEN, sample_published
from tests.support.wait import wait_until


@pytest.mark.broker
class PublishingScenarios(StopsWorkers):
    """Each transport's `TestPublishingOn<Transport>` runs these on its own `bench` fixture."""

    @pytest.mark.fault
    async def test_sigkill_between_the_publish_and_the_ack_duplicates_same_id(
        self, bench: Bench, tmp_path: Path
    ) -> None:
        """The worker dies once its handler's message is confirmed, before the event's ack:
        the event is delivered again and its handler publishes again, the same message id;
        never a loss."""
        got: list[tuple[str, Any]] = []

        async def record(self: EventConsumer, event: Event) -> None:
            got.append((event.message_id or "", event.data))

        done = consumer(bench.name("done"), ("APP.FAULT.DONE",), record)
        markers = tmp_path / "markers"
        markers.mkdir()
        log = tmp_path / "record.txt"
        async with Worker(bench.settings, [done]):
            kind = "tests.support.consumers:PublishesThenDies"
            worker = await start_worker(bench, log, 0, kind, B24QT_MARKERS=str(markers))
            [root] = await bench.post("crm-deal-add")
            assert await asyncio.wait_for(worker.wait(), 30) == -signal.SIGKILL
            worker = await start_worker(bench, log, 0, kind, B24QT_MARKERS=str(markers))
            # Within the lease (the database queues: handle_timeout_s + 5 s) or at once.
            await wait_until(lambda: len(got) == 2, 30, "the message twice")
            await asyncio.sleep(0.5)
            worker.send_signal(signal.SIGTERM)
            await asyncio.wait_for(worker.wait(), 30)
        expected = derived_id("handler", bench.name("proc"), root, "APP.FAULT.DONE", "index:0")
        assert got == [(expected, {"of": root})] * 2
        assert list(records(log, "start")) == [root]  # one event, handled twice

    async def test_a_handlers_message_reaches_another_consumer_with_portal_and_chain(
        self, bench: Bench
    ) -> None:
        got: list[dict[str, Any]] = []

        async def first(self: EventConsumer, event: Event) -> None:
            await self.publish("APP.DEAL.RECHECK", {"deal": event.data["FIELDS"]["ID"]}, key="k")

        async def second(self: EventConsumer, event: Event) -> None:
            await self.publish("APP.DEAL.SYNCED", {"deal": event.data["deal"]})
            got.append(facts(event))

        async def third(self: EventConsumer, event: Event) -> None:
            got.append(facts(event))

        deals = bench.name("deals")
        classes = [
            consumer(deals, ("ONCRMDEALADD",), first),
            consumer(bench.name("rechecks"), ("APP.DEAL.RECHECK",), second),
            consumer(bench.name("synced"), ("APP.DEAL.*",), third),  # a pattern binds them too
        ]
        async with Worker(bench.settings, classes):
            [root] = await bench.post("crm-deal-add")
            await wait_until(lambda: len(got) == 3, what="the chain handled")
            await asyncio.sleep(0.3)  # nothing more comes
        auth = sample_published("crm-deal-add")["auth"]
        deal = sample_published("crm-deal-add")["data"]["FIELDS"]["ID"]
        recheck_id = derived_id("handler", deals, root, "APP.DEAL.RECHECK", "key:k")
        by_name: dict[str, list[dict[str, Any]]] = {}
        for fact in got:
            by_name.setdefault(fact["name"], []).append(fact)
        assert len(by_name["APP.DEAL.RECHECK"]) == 2 and len(by_name["APP.DEAL.SYNCED"]) == 1
        for fact in got:
            assert fact["member_id"] == auth["member_id"] and fact["domain"] == auth["domain"]
            # The portal's token digest travels (self.portal(event) calls that portal)...
            assert fact["digest"] == token_digest(SAMPLE_TOKEN)
            assert fact["correlation_id"] == root  # ...and the chain's id, all along
        assert {f["message_id"] for f in by_name["APP.DEAL.RECHECK"]} == {recheck_id}
        assert {f["caused_by"] for f in by_name["APP.DEAL.RECHECK"]} == {root}
        [synced] = by_name["APP.DEAL.SYNCED"]
        assert synced["caused_by"] == recheck_id and synced["data"] == {"deal": deal}

    async def test_a_handler_that_raises_publishes_nothing_its_retry_once(
        self, bench: Bench
    ) -> None:
        attempts: list[int] = []
        got: list[tuple[str, Any]] = []

        async def flaky(self: EventConsumer, event: Event) -> None:
            attempts.append(event.attempt)
            await self.publish("APP.FLAKY.DONE", {"attempt": event.attempt})
            if event.attempt == 1:
                raise Retry("the first attempt fails after publishing")

        async def record(self: EventConsumer, event: Event) -> None:
            got.append((event.message_id or "", event.data))

        flaky_queue = bench.name("flaky")
        classes = [
            consumer(flaky_queue, ("ONCRMDEALADD",), flaky, retry_delays_s=(0.3,)),
            consumer(bench.name("done"), ("APP.FLAKY.DONE",), record),
        ]
        async with Worker(bench.settings, classes):
            [root] = await bench.post("crm-deal-add")
            await wait_until(lambda: len(got) == 1, what="the retry's message")
            await asyncio.sleep(0.5)  # nothing more comes
        assert attempts == [1, 2]
        assert got == [
            (derived_id("handler", flaky_queue, root, "APP.FLAKY.DONE", "index:0"), {"attempt": 2})
        ]

    async def test_producer_publishes_confirmed_and_a_key_is_one_message_id(
        self, bench: Bench
    ) -> None:
        every: list[tuple[str, str | None]] = []
        once: list[str] = []

        async def record(self: EventConsumer, event: Event) -> None:
            every.append((event.message_id or "", event.auth.member_id))

        async def record_once(self: EventConsumer, event: Event) -> None:
            once.append(event.message_id or "")

        classes = [
            consumer(bench.name("all"), ("APP.#",), record),
            consumer(
                bench.name("once"), ("APP.NIGHTLY",), record_once, idempotency=MemorySeenStore()
            ),
        ]
        portal = make_event("ONAPPINSTALL", member_id="a" * 32)
        async with Worker(bench.settings, classes):
            async with Producer(bench.settings) as producer:
                keyed = await producer.publish("APP.NIGHTLY", {"n": 1}, portal=portal, key="d1")
                again = await producer.publish("APP.NIGHTLY", {"n": 1}, portal=portal, key="d1")
                plain = await producer.publish("app.nightly", {"n": 2}, portal=portal)
            await wait_until(lambda: len(every) == 3, what="three deliveries")
            await wait_until(lambda: len(once) == 2, what="two handled once each")
            await asyncio.sleep(0.3)
        assert keyed == again != plain
        assert sorted(m for m, _ in every) == sorted([keyed, keyed, plain])
        assert {member for _, member in every} == {"a" * 32}
        assert sorted(once) == sorted([keyed, plain])  # the idempotency store drops the copy


def facts(event: Event) -> dict[str, Any]:
    return {
        "name": event.name,
        "message_id": event.message_id,
        "member_id": event.auth.member_id,
        "domain": event.auth.domain,
        "digest": token_digest_of(event),
        "caused_by": event.caused_by,
        "correlation_id": event.correlation_id,
        "data": event.data,
    }
