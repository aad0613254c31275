"""Fair share per portal at the queue (docs/fairness.md): a flooded portal and quiet ones, the
per-portal cap across two worker processes, weights, and first in, first out when it is off.
Run by the transports that declare they keep it (`SharesByPortal`); the others skip it, and the
cap's scenario is skipped where the transport does not hold one (`CapsPerPortal`).

A "turn" here is one handler start, of any portal: a quiet portal's event must start within a
bounded number of them after it was published (about one round of the slots), while a flood of
thousands waits; on a queue that is first in, first out it waits for the whole flood."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from b24queue import Event, EventConsumer
from b24queue import _constants as c
from b24queue.events.envelope import Envelope, envelope_for
from b24queue.transports import CapsPerPortal, SharesByPortal, connection_name
from b24queue.worker import Worker
from tests.conformance.processes import StopsWorkers, start_worker
from tests.support.bench import Bench
from tests.support.consumers import consumer
from tests.support.wait import wait_until

FLOOD = "flood" + "0" * 27
QUIET = ("quiet1" + "0" * 26, "quiet2" + "0" * 26)
# The handlers of the two-process scenarios: a turn (a slot freeing) is 100 ms / 8, long beside
# the time a loaded machine may keep a worker process off the CPU between its claim and the
# handler's start (what the record sees).
SLOW_S = 0.1


def envelope(member_id: str, n: int = 1) -> list[Envelope]:
    payload = {
        "event": "ONCRMDEALADD",
        "data": {"FIELDS": {"ID": "1"}},
        "auth": {
            "domain": f"{member_id[:10]}.bitrix24.com",
            "member_id": member_id,
            "client_endpoint": f"https://{member_id[:10]}.bitrix24.com/rest/",
        },
    }
    return [envelope_for(Event.from_payload(payload)) for _ in range(n)]


@contextlib.asynccontextmanager
async def sink(bench: Bench) -> AsyncIterator[Any]:
    async with bench.transport.publisher(connection_name("ingress", bench.prefix)) as publisher:
        await wait_until(publisher.is_ready, 15, "the publisher ready")
        yield publisher


async def publish(bench: Bench, envelopes: list[Envelope]) -> None:
    """Through the transport's own publisher, many at once (its group commit)."""
    async with sink(bench) as publisher:
        for i in range(0, len(envelopes), 500):
            await asyncio.gather(*(publisher.publish(e) for e in envelopes[i : i + 500]))


async def declare_for_workers(bench: Bench) -> None:
    """The queue the worker processes of `start_worker` consume, declared before the flood."""

    async def handle(self: EventConsumer, event: Event) -> None:
        return None

    await bench.transport.declare([consumer(bench.name("proc"), ("#",), handle)])


def turns_waited(starts: list[tuple[float, str]], published: float, message_id: str) -> int:
    """Handler starts (time, message_id) of any portal after `message_id` was published (its
    commit returned) and before its own start (which may come first: then none)."""
    mine = next(t for t, m in starts if m == message_id)
    return sum(1 for t, _ in starts if published <= t < mine)


def read_record(path: Path) -> list[tuple[str, str, float, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            out.append((parts[0], parts[1], float(parts[2]), parts[3]))
    return out


def peak_in_flight(record: list[tuple[str, str, float, str]], member_id: str) -> int:
    """The most handlers of `member_id` running at once, from their start and done lines."""
    moves = sorted((t, 1 if kind == "start" else -1) for kind, m, t, _ in record if m == member_id)
    running = peak = 0
    for _, step in sorted(moves, key=lambda x: (x[0], x[1])):  # a done before a start at a tie
        running += step
        peak = max(peak, running)
    return peak


async def quiet_beside_flood_in_two_workers(
    bench: Bench, tmp_path: Path, quiet: int, **env: str
) -> tuple[list[Any], list[tuple[float, str]], list[tuple[float, str]]]:
    """A flood of 1,000 handled by two worker processes (`env`: their consumer's settings), and
    `quiet` events of the two quiet portals in turn published 50 ms apart once it is under way:
    the record's lines, the handler starts (time, message_id) in order, and when each quiet
    event was published."""
    record = tmp_path / "record.txt"
    await declare_for_workers(bench)
    await publish(bench, envelope(FLOOD, 1000))
    workers = [
        await start_worker(bench, record, SLOW_S, "tests.support.consumers:PortalRecorder", **env)
        for _ in range(2)
    ]
    try:
        await wait_until(lambda: len(read_record(record)) >= 50, 30, "the flood under way")
        published = []
        async with sink(bench) as publisher:
            for i in range(quiet):
                [e] = envelope(QUIET[i % 2])
                await publisher.publish(e)
                published.append((time.time(), e.message_id or ""))
                await asyncio.sleep(0.05)

        def quiet_started() -> bool:
            got = Counter(m for kind, m, _, _ in read_record(record) if kind == "start")
            return all(got[m] == quiet // 2 for m in QUIET)

        await wait_until(quiet_started, 30, "every quiet event started")
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            await asyncio.wait_for(worker.wait(), 30)
    lines = read_record(record)
    starts = sorted((t, i) for kind, _, t, i in lines if kind == "start")
    return lines, starts, published


@pytest.mark.broker
class FairShareScenarios(StopsWorkers):
    """Each transport that keeps the fair share runs these on its own `bench` fixture."""

    @pytest.fixture(autouse=True)
    async def _keeps_it(self, bench: Bench) -> AsyncIterator[None]:
        if not isinstance(bench.transport, SharesByPortal):
            pytest.skip(f"the {bench.transport.name} transport does not keep the fair share")
        yield

    async def test_a_quiet_portal_waits_about_one_turn_behind_a_flood(self, bench: Bench) -> None:
        starts: list[tuple[float, str]] = []
        flood = 0

        async def handle(self: EventConsumer, event: Event) -> None:
            nonlocal flood
            starts.append((time.monotonic(), event.message_id or ""))
            flood += event.auth.member_id == FLOOD
            await asyncio.sleep(0.01)

        cls = consumer(bench.name("fair"), ("ONCRMDEALADD",), handle, prefetch=8)
        async with Worker(bench.settings, [cls]):
            await publish(bench, envelope(FLOOD, 3000))
            await wait_until(lambda: len(starts) >= 100, 30, "the flood under way")
            waited = []
            async with sink(bench) as publisher:
                for i in range(10):
                    member = QUIET[i % 2]
                    [e] = envelope(member)
                    await publisher.publish(e)
                    published = time.monotonic()
                    await wait_until(
                        lambda i=e.message_id: any(m == i for _, m in starts),
                        30,
                        "the quiet event",
                    )
                    waited.append(turns_waited(starts, published, e.message_id or ""))
            flood_left = 3000 - flood
        # One slot frees about every 10 ms / 8; the quiet event takes a slot in the first claim
        # that sees it. Counted in handler starts, not claims, a loaded machine adds what was
        # claimed before it but starts after it: the slots a claim under way gives (up to 8), the
        # rows claimed earlier whose handlers have not started yet (up to 8), and those of its
        # own claim that start first (up to 7). On an idle machine it waits 7 or fewer; a queue
        # first in, first out makes it wait for the flood (about 2,900).
        assert max(waited) <= 3 * 8, waited
        assert flood_left > 500, flood_left  # the flood was still waiting all along

    @pytest.mark.long
    async def test_two_worker_processes_share_turns_and_hold_the_cap(
        self, bench: Bench, tmp_path: Path
    ) -> None:
        if not isinstance(bench.transport, CapsPerPortal):
            pytest.skip(f"the {bench.transport.name} transport does not hold a per-portal cap")
        lines, starts, published = await quiet_beside_flood_in_two_workers(
            bench, tmp_path, 12, B24QT_PREFETCH="4", B24QT_CAP="2"
        )
        flood = sum(1 for kind, m, _, _ in lines if kind == "start" and m == FLOOD)
        # The flood is capped at 2 in flight (across both processes), so the 2 x 4 slots have
        # room: a quiet event starts within about one turn, and never waits for the flood.
        waited = [turns_waited(starts, t, m) for t, m in published]
        assert peak_in_flight(lines, FLOOD) == 2
        assert max(waited) <= 6, waited
        assert flood < 1000  # still waiting at the end

    @pytest.mark.long
    async def test_a_quiet_portal_gets_turns_across_two_worker_processes(
        self, bench: Bench, tmp_path: Path
    ) -> None:
        lines, starts, published = await quiet_beside_flood_in_two_workers(
            bench, tmp_path, 10, B24QT_PREFETCH="4"
        )
        flood = sum(1 for kind, m, _, _ in lines if kind == "start" and m == FLOOD)
        # All 2 x 4 slots busy with the flood: the next one to free goes to the quiet event
        # (a claim of the other process already under way may take one or two before it).
        waited = [turns_waited(starts, t, m) for t, m in published]
        assert max(waited) <= 8, waited
        assert flood < 1000  # the flood waited all along

    async def test_weights_change_the_shares(self, bench: Bench) -> None:
        heavy, light = QUIET
        order: list[str] = []

        async def handle(self: EventConsumer, event: Event) -> None:
            order.append(event.auth.member_id or "")
            await asyncio.sleep(0.002)

        cls = consumer(
            bench.name("weights"),
            ("ONCRMDEALADD",),
            handle,
            prefetch=4,
            portal_weights={heavy: 3},
        )
        # Declared first (what `b24queue topology` does): the events published above are bound.
        await bench.transport.declare([cls])
        await publish(bench, envelope(heavy, 400) + envelope(light, 400))
        async with Worker(bench.settings, [cls]):
            await wait_until(lambda: len(order) >= 400, 30, "400 handled")
        shares = Counter(order[:400])
        assert 2.5 * shares[light] <= shares[heavy] <= 3.5 * shares[light], shares

    async def test_off_it_is_first_in_first_out_across_portals(self, bench: Bench) -> None:
        order: list[str] = []

        async def handle(self: EventConsumer, event: Event) -> None:
            order.append(event.auth.member_id or "")

        cls = consumer(bench.name("fifo"), ("ONCRMDEALADD",), handle, prefetch=4, fair_share=False)
        await bench.transport.declare([cls])
        await publish(bench, envelope(FLOOD, 300))
        await publish(bench, envelope(QUIET[0], 5))
        async with Worker(bench.settings, [cls]):
            await wait_until(lambda: len(order) == 305, 30, "all handled")
        assert order == [FLOOD] * 300 + [QUIET[0]] * 5


@pytest.mark.broker
class FairShareUpgradeScenarios:
    """A queue made before fair claims (schema 2) upgrades in place with events waiting: none
    lost, each row's portal taken from its headers ("" without one). Each transport says how
    to take its queue back to schema 2 (`to_schema_2`)."""

    async def to_schema_2(self, bench: Bench) -> None:
        raise NotImplementedError

    async def test_upgrade_in_place_with_events_waiting(self, bench: Bench) -> None:
        order: list[str] = []

        async def handle(self: EventConsumer, event: Event) -> None:
            order.append(event.auth.member_id or "-")

        cls = consumer(bench.name("upgraded"), ("ONCRMDEALADD",), handle, prefetch=2)
        await bench.transport.declare([cls])
        nobody = envelope(FLOOD)[0]
        nobody = Envelope(
            nobody.message_id,
            nobody.routing_key,
            nobody.body,
            {},
            nobody.timestamp,
            nobody.event_type,
        )
        # Headers holding what PostgreSQL's jsonb refuses (a NUL in a handler's error text): the
        # upgrade must not fail on them.
        [odd] = envelope(QUIET[0])
        odd = Envelope(
            odd.message_id,
            odd.routing_key,
            odd.body,
            {**odd.headers, c.H_ERROR_MESSAGE: "a NUL \x00 in an error"},
            odd.timestamp,
            odd.event_type,
        )
        await publish(bench, envelope(FLOOD, 60))
        await publish(bench, [*envelope(QUIET[0], 3), odd, nobody])
        await self.to_schema_2(bench)
        async with Worker(bench.settings, [cls]):
            await wait_until(lambda: len(order) == 65, 30, "every waiting event handled")
        # (the one without a header names the flood in its body: it is counted there)
        assert Counter(order) == {FLOOD: 61, QUIET[0]: 4}
        # The quiet portal's rows got their portal: they took turns with the flood.
        assert max(i for i, m in enumerate(order) if m == QUIET[0]) < 12, order
