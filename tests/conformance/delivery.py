"""Routing, fan-out, unrouted, retries, dead letters and prefetch: the same on every transport
(each runs them through its own `bench`: tests/transports/<name>/test_conformance.py)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest

from b24queue import Event, EventConsumer, PortalError, Property, Reject, Robot, RobotConsumer
from b24queue import _constants as c
from b24queue.events.envelope import envelope_for
from b24queue.telemetry.metrics import WorkerMetrics
from b24queue.testing import make_call
from b24queue.worker import Worker
from tests.support.bench import Bench
from tests.support.consumers import Handle, consumer
from tests.support.samples import SAMPLE_NAMES, sample_published
from tests.support.wait import wait_until

_ROBOT = Robot(
    code="conform",
    name="Conformance",
    return_properties={"greeting": Property(name="Greeting")},
)


class _FlakyPortal:
    """A portal whose first call fails with a 500, for every event (the portal side is not what
    these scenarios test: the transport's retry copy is)."""

    def __init__(self) -> None:
        self.tries = 0
        self.sent: list[dict[str, Any]] = []

    def for_event(self, event: Event) -> _FlakyPortal:
        return self

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        self.tries += 1
        if self.tries == 1:
            raise PortalError("INTERNAL_SERVER_ERROR", "Internal server error", status=500)
        self.sent.append(dict(params or {}))
        return True


@pytest.mark.broker
class DeliveryScenarios:
    """Each transport's `TestDeliveryOn<Transport>` runs these on its own `bench` fixture."""

    async def test_every_sample_once_to_the_right_consumers_fanned_out(self, bench: Bench) -> None:
        deals: Counter[str] = Counter()
        everything: Counter[str] = Counter()
        bodies: dict[str, dict[str, Any]] = {}

        async def on_deal(self: EventConsumer, event: Event) -> None:
            deals[event.message_id or ""] += 1

        async def on_any(self: EventConsumer, event: Event) -> None:
            everything[event.message_id or ""] += 1
            bodies[event.message_id or ""] = event.payload

        classes = [
            consumer(bench.name("deals"), ("ONCRMDEALADD", "ONCRMDEALUPDATE"), on_deal),
            consumer(bench.name("all"), ("#",), on_any),
        ]
        async with Worker(bench.settings, classes):
            ids = await bench.post(*SAMPLE_NAMES)
            await wait_until(lambda: len(everything) == len(ids), what="every sample handled")
            deal_ids = {
                i for i, n in zip(ids, SAMPLE_NAMES, strict=True) if n.startswith("crm-deal")
            }
            await wait_until(lambda: set(deals) == deal_ids, what="the deals handled")
        assert set(everything.values()) == {1} and set(deals.values()) == {1}
        for message_id, name in zip(ids, SAMPLE_NAMES, strict=True):
            assert bodies[message_id] == sample_published(name)

    async def test_topic_patterns_and_unrouted_kept(self, bench: Bench) -> None:
        got: dict[str, set[str]] = {"catalog": set(), "product": set()}

        def recorder(key: str) -> Handle:
            async def handle(self: EventConsumer, event: Event) -> None:
                got[key].add(event.name)

            return handle

        classes = [
            consumer(bench.name("catalog"), ("CATALOG.#",), recorder("catalog")),
            consumer(bench.name("product"), ("CATALOG.PRODUCT.ON.*",), recorder("product")),
        ]
        async with Worker(bench.settings, classes):
            [task_id] = await bench.post("task-add")  # nobody binds ONTASKADD
            await bench.post("catalog-product-add", "catalog-price-update")
            await wait_until(lambda: len(got["catalog"]) == 2 and len(got["product"]) == 1)
        assert got["product"] == {"CATALOG.PRODUCT.ON.ADD"}
        async with bench.transport.dead_letters(bench.settings.unrouted) as unrouted:
            total, letters = await unrouted.list(10)
        assert total == 1 and [x.message_id for x in letters] == [task_id]

    async def test_retries_wait_their_delay_count_attempts_then_dead_letter(
        self, bench: Bench
    ) -> None:
        attempts: list[tuple[int, float]] = []
        delays = (0.3, 0.6)

        async def always_fails(self: EventConsumer, event: Event) -> None:
            attempts.append((event.attempt, time.monotonic()))
            raise ValueError(f"cannot sync deal (token {event.auth.access_token})")

        cls = consumer(
            bench.name("broken"),
            ("ONCRMDEALADD",),
            always_fails,
            max_attempts=3,
            retry_delays_s=delays,
        )
        async with Worker(bench.settings, [cls]):
            [message_id] = await bench.post("crm-deal-add")
            async with bench.transport.dead_letters(cls.queue) as dlq:

                async def dead() -> bool:
                    return await dlq.count() == 1

                await wait_until(dead, what="the dead letter")
                _total, [letter] = await dlq.list(10)
        assert [a for a, _ in attempts] == [1, 2, 3]
        waited = [b - a for (_, a), (_, b) in itertools.pairwise(attempts)]
        for got, wanted in zip(waited, delays, strict=True):
            assert wanted * 0.9 <= got <= wanted + 2.0, (waited, delays)
        assert letter.message_id == message_id and letter.reason == "max_attempts"
        assert letter.attempts == 3 and letter.error.startswith("ValueError: cannot sync deal")
        # The body leaves the event's OAuth tokens out: the handler had none to quote.
        assert "(token None)" in letter.error
        assert letter.first_failed_at and letter.last_failed_at

    async def test_a_robots_answer_rides_the_retry_copy(self, bench: Bench) -> None:
        """A robot's first bizproc.event.send fails: the retry copy carries the answer, so the
        retry sends it without running the handler again (b24queue.bizproc)."""
        runs: list[int] = []
        portal = _FlakyPortal()

        async def greet(self: EventConsumer, event: Event) -> dict[str, str]:
            runs.append(event.attempt)
            return {"greeting": "Hello, " + "x" * 4000}  # a header of a few KB

        cls = type(
            "Greeter",
            (RobotConsumer,),
            {
                "queue": bench.name("robot"),
                "bizproc": _ROBOT,
                "handle": greet,
                "retry_delays_s": (0.2,),
            },
        )
        async with Worker(bench.settings, [cls], portals=portal):
            async with bench.transport.publisher("conformance robot") as sink:
                await wait_until(sink.is_ready, 15, "the publisher ready")
                await sink.publish(envelope_for(make_call(_ROBOT, {"who": "Ada"})))
            await wait_until(lambda: portal.sent, what="the answer sent on the retry")
        assert runs == [1]
        assert portal.tries == 2
        assert portal.sent == [
            {
                "EVENT_TOKEN": "test-event-token|A1_2_3|x",
                "RETURN_VALUES": {"greeting": "Hello, " + "x" * 4000},
            }
        ]

    async def test_reject_dead_letters_now_and_replay_and_purge(self, bench: Bench) -> None:
        seen: list[tuple[str, int]] = []
        rejecting = True

        async def handle(self: EventConsumer, event: Event) -> None:
            seen.append((event.message_id or "", event.attempt))
            if rejecting:
                raise Reject("no deal id")

        cls = consumer(bench.name("strict"), ("ONCRMDEALADD",), handle)
        async with Worker(bench.settings, [cls]):
            ids = await bench.post("crm-deal-add", "crm-deal-add", "crm-deal-add")
            async with bench.transport.dead_letters(cls.queue + c.DLQ_SUFFIX) as dlq:

                async def all_dead() -> bool:
                    return await dlq.count() == 3

                await wait_until(all_dead, what="three dead letters")
                total, letters = await dlq.list(2)
                assert total == 3 and [x.message_id for x in letters] == ids[:2]
                assert {x.reason for x in letters} == {"rejected"}
                rejecting = False
                replayed, _ = await dlq.replay(ids={ids[1]})
                assert replayed == 1
                await wait_until(lambda: (ids[1], 1) in seen[3:], what="the replayed event")
                assert await dlq.purge(1) == 1  # the first one, as shown
                left = await dlq.list(10)
                assert [x.message_id for x in left[1]] == [ids[2]]
        assert [i for i, _ in seen[:3]] == ids

    async def test_prefetch_bounds_handlers_in_flight(self, bench: Bench) -> None:
        running = 0
        peak = 0
        release = asyncio.Event()
        done: list[str] = []

        async def slow(self: EventConsumer, event: Event) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await release.wait()
            running -= 1
            done.append(event.message_id or "")

        def gauge() -> float | None:
            return metrics.registry.get_sample_value(
                "b24queue_worker_in_flight", {"queue": cls.queue}
            )

        cls = consumer(bench.name("slow"), ("ONCRMDEALADD",), slow, prefetch=3)
        metrics = WorkerMetrics()
        async with Worker(bench.settings, [cls], metrics=metrics):
            await bench.post(*["crm-deal-add"] * 8)
            await wait_until(lambda: running == 3, what="three in flight")
            assert gauge() == 3  # the in-flight gauge counts them as they run
            release.set()
            await wait_until(lambda: len(done) == 8, what="all eight")
            await wait_until(lambda: gauge() == 0, what="none in flight")
        assert peak == 3

    async def test_status_reports_depth_and_dead_letters(self, bench: Bench) -> None:
        async def reject(self: EventConsumer, event: Event) -> None:
            raise Reject("no")

        cls = consumer(bench.name("stat"), ("ONCRMDEALADD",), reject)
        async with Worker(bench.settings, [cls]):
            await bench.post("crm-deal-add", "crm-deal-add")
            async with bench.transport.dead_letters(cls.queue) as dlq:

                async def dead() -> bool:
                    return await dlq.count() == 2

                await wait_until(dead, what="two dead letters")

        async def reported() -> bool:
            status = await bench.transport.status()
            rows = [r for r in status.queues if r.queue == cls.queue]
            return bool(rows) and rows[0].dead_letters == 2

        await wait_until(reported, timeout_s=20, what="status with the DLQ")
