"""Order within an entity at the queue (docs/fairness.md): events of one portal and key never in
handlers at once and started in the order accepted, in one worker and across two worker
processes, with a retry in the middle under each rule; different keys of one portal still run
side by side; a queue made before order keys upgrades in place with events waiting. Run by the
transports that declare they keep it (`OrdersByKey`); the others skip it."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from b24queue import Event, EventConsumer, Reject, Retry
from b24queue.events.envelope import Envelope, envelope_for
from b24queue.transports import OrdersByKey
from b24queue.worker import Worker
from tests.conformance.fairness import QUIET, publish
from tests.conformance.processes import StopsWorkers, start_worker
from tests.support.bench import Bench
from tests.support.consumers import consumer
from tests.support.wait import wait_until

KEYS = ("101", "102", "103", "104")
PORTAL = QUIET[0]
# (kind, key, time, seq): kind start, done or fail (the end of a failed attempt)
Line = tuple[str, str, float, int]


def keyed(n_per_key: int, retry_at: int = 2, keys: tuple[str, ...] = KEYS) -> list[Envelope]:
    """`n_per_key` events of each key, the keys taking turns, numbered (SEQ) in the order
    published; the first key's event number `retry_at` fails its first attempt (RETRY)."""
    out = []
    for i in range(n_per_key):
        for key in keys:
            fields = {"ID": key, "SEQ": str(len(out))}
            if key == keys[0] and i == retry_at:
                fields["RETRY"] = "1"
            payload = {
                "event": "ONCRMDEALUPDATE",
                "data": {"FIELDS": fields},
                "auth": {"member_id": PORTAL, "domain": "quiet.bitrix24.com"},
            }
            out.append(envelope_for(Event.from_payload(payload)))
    return out


def retried_seq(envelopes: list[Envelope]) -> int:
    return next(i for i, e in enumerate(envelopes) if b'"RETRY"' in e.body)


def by_key(lines: list[Line]) -> dict[str, list[Line]]:
    out: dict[str, list[Line]] = defaultdict(list)
    for line in sorted(lines, key=lambda x: x[2]):
        out[line[1]].append(line)
    return out


def assert_one_at_a_time(lines: list[Line]) -> None:
    """Per key, in time: a start, then its own end, then the next start (never two at once)."""
    for key, seen in by_key(lines).items():
        for i in range(0, len(seen), 2):
            start, end = seen[i], seen[i + 1] if i + 1 < len(seen) else None
            assert start[0] == "start" and end is not None, (key, seen)
            assert end[0] in ("done", "fail") and end[3] == start[3], (key, seen)


def starts(lines: list[Line], key: str) -> list[int]:
    return [seq for kind, _, _, seq in by_key(lines)[key] if kind == "start"]


def assert_order(lines: list[Line], strict: bool, retried: int) -> None:
    """Every key's events started in the order published; the retried one (of the first key)
    again straight after its failure under the strict rule, after later ones under the lenient
    one (they passed it while it waited)."""
    for key in KEYS[1:]:
        got = starts(lines, key)
        assert got == sorted(got) and len(got) == len(set(got)), (key, got)
    got = starts(lines, KEYS[0])
    again = got.index(retried) + 1 + got[got.index(retried) + 1 :].index(retried)
    if strict:
        assert again == got.index(retried) + 1, got  # nothing passed it
        assert got == sorted(got), got
    else:
        rest = got[:again] + got[again + 1 :]
        assert rest == sorted(rest), got
        assert got[again - 1] > retried, got  # a later event passed it while it waited


def most_keys_at_once(lines: list[Line]) -> int:
    moves = sorted((t, 1 if kind == "start" else -1) for kind, _, t, _ in lines)
    running = peak = 0
    for _, step in moves:
        running += step
        peak = max(peak, running)
    return peak


def read_lines(path: Path) -> list[Line]:
    return [line for line, _ in read_coalesced(path)]


def read_coalesced(path: Path) -> list[tuple[Line, tuple[str, ...]]]:
    """The record's lines, each with the message_ids coalesced into it (its fifth field)."""
    if not path.exists():
        return []
    out = []
    for text in path.read_text().splitlines():
        parts = text.split()
        if len(parts) in (4, 5):
            replaced = tuple(parts[4].split(",")) if len(parts) == 5 else ()
            out.append(((parts[0], parts[1], float(parts[2]), int(parts[3])), replaced))
    return out


async def left_in(bench: Bench, queue: str) -> tuple[int, int, int, int]:
    """(ready, in handlers, waiting for a retry, dead letters) of `queue`."""
    [row] = [r for r in (await bench.transport.status()).queues if r.queue == queue]
    return row.ready, row.unacked, row.retrying, row.dead_letters


def ordered_consumer(
    bench: Bench, name: str, lines: list[Line], rule: str, **attrs: object
) -> type[EventConsumer]:
    async def handle(self: EventConsumer, event: Event) -> None:
        fields = event.data["FIELDS"]
        key, seq = fields["ID"], int(fields["SEQ"])
        lines.append(("start", key, time.monotonic(), seq))
        await asyncio.sleep(0.02)
        failed = fields.get("RETRY") == "1" and event.attempt == 1
        lines.append(("fail" if failed else "done", key, time.monotonic(), seq))
        if failed:
            raise Retry("the scenario's retry in the middle")

    settings: dict[str, object] = {
        "prefetch": 8,
        "retry_delays_s": (0.3,),
        "ordering_key": "data.FIELDS.ID",
        "ordering": rule,
    }
    return consumer(bench.name(name), ("ONCRMDEALUPDATE",), handle, **(settings | attrs))


@pytest.mark.broker
class OrderingScenarios(StopsWorkers):
    """Each transport that keeps the order runs these on its own `bench` fixture."""

    @pytest.fixture(autouse=True)
    async def _keeps_it(self, bench: Bench) -> AsyncIterator[None]:
        if not isinstance(bench.transport, OrdersByKey):
            pytest.skip(f"the {bench.transport.name} transport does not keep the order")
        yield

    @pytest.mark.parametrize("fair_share", [True, False])
    @pytest.mark.parametrize("rule", ["strict", "lenient"])
    async def test_one_key_at_a_time_in_order_other_keys_beside_it(
        self, bench: Bench, rule: str, fair_share: bool
    ) -> None:
        lines: list[Line] = []
        cls = ordered_consumer(bench, "ordered", lines, rule, fair_share=fair_share)
        await bench.transport.declare([cls])
        events = keyed(8)
        await publish(bench, events)
        async with Worker(bench.settings, [cls]):
            await wait_until(
                lambda: sum(k == "done" for k, *_ in lines) == len(events), 30, "all handled"
            )
        assert_one_at_a_time(lines)
        assert_order(lines, rule == "strict", retried_seq(events))
        # Four keys, eight slots: the keys ran side by side (one at a time each).
        assert most_keys_at_once(lines) >= 3, lines

    async def test_events_without_a_key_are_not_held(self, bench: Bench) -> None:
        lines: list[Line] = []
        cls = ordered_consumer(bench, "nokey", lines, "strict", ordering_key="data.FIELDS.NONE")
        events = keyed(4, retry_at=99, keys=("1",))
        await bench.transport.declare([cls])
        await publish(bench, events)
        async with Worker(bench.settings, [cls]):
            await wait_until(lambda: sum(k == "done" for k, *_ in lines) == 4, 30, "all handled")
        assert most_keys_at_once(lines) == 4  # no key: all four at once

    @pytest.mark.long
    @pytest.mark.parametrize("rule", ["strict", "lenient"])
    async def test_two_worker_processes_keep_the_order(
        self, bench: Bench, tmp_path: Path, rule: str
    ) -> None:
        record = tmp_path / "record.txt"
        workers = [
            await start_worker(
                bench,
                record,
                0.03,
                "tests.support.consumers:OrderRecorder",
                B24QT_ORDERING=rule,
                B24QT_PREFETCH="4",
            )
            for _ in range(2)
        ]
        events = keyed(15)
        try:
            await publish(bench, events)
            await wait_until(
                lambda: sum(k == "done" for k, *_ in read_lines(record)) == len(events),
                60,
                "all handled",
            )
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            for worker in workers:
                await asyncio.wait_for(worker.wait(), 30)
        lines = read_lines(record)
        assert_one_at_a_time(lines)
        assert_order(lines, rule == "strict", retried_seq(events))
        assert most_keys_at_once(lines) >= 3

    @pytest.mark.fault
    async def test_a_worker_killed_mid_handler_holds_its_key_until_its_lease_ends(
        self, bench: Bench, tmp_path: Path
    ) -> None:
        record = tmp_path / "record.txt"
        env = {"B24QT_ORDERING": "strict", "B24QT_PREFETCH": "4"}
        recorder = "tests.support.consumers:OrderRecorder"
        first = await start_worker(bench, record, 1.0, recorder, **env)
        events = keyed(3, retry_at=99, keys=("7",))
        await publish(bench, events)
        await wait_until(lambda: len(read_lines(record)) >= 1, 30, "the first event started")
        second = await start_worker(bench, record, 0.0, recorder, **env)
        first.kill()
        await first.wait()
        killed_at = time.time()
        try:
            await wait_until(
                lambda: sum(k == "done" for k, *_ in read_lines(record)) == 3, 60, "all handled"
            )
        finally:
            second.send_signal(signal.SIGTERM)
            await asyncio.wait_for(second.wait(), 30)
        lines = read_lines(record)
        # The killed handling, then the same event again (once its lease ran: nothing of its key
        # ran meanwhile), then the others in order, one at a time.
        assert [(k, seq) for k, _, _, seq in lines] == [
            ("start", 0),
            ("start", 0),
            ("done", 0),
            ("start", 1),
            ("done", 1),
            ("start", 2),
            ("done", 2),
        ], lines
        assert lines[1][2] > killed_at

    @pytest.mark.parametrize("unstorable", ["\x00", "\ud800"])
    async def test_a_key_no_database_stores_keeps_its_order_and_stops_no_claim(
        self, bench: Bench, unstorable: str
    ) -> None:
        """A key holding a NUL (PostgreSQL's text refuses it; the ingress accepts
        `data[FIELDS][ID]=4%002`) or a lone surrogate (not UTF-8: SQLite refuses it) is kept as
        a digest: its events still share one order, and the other keys' events are claimed."""
        lines: list[Line] = []
        cls = ordered_consumer(
            bench,
            "unstorable",
            lines,
            "strict",
            ordering_key=lambda event: event.data["FIELDS"]["ID"].replace("x", unstorable),
        )
        await bench.transport.declare([cls])
        events = keyed(4, retry_at=99, keys=("4x2", "7"))
        await publish(bench, events)
        async with Worker(bench.settings, [cls]):
            await wait_until(
                lambda: sum(k == "done" for k, *_ in lines) == len(events), 30, "all handled"
            )
        assert_one_at_a_time(lines)
        assert starts(lines, "4x2") == [0, 2, 4, 6] and starts(lines, "7") == [1, 3, 5, 7]

    async def test_coalescing_hands_over_the_latest_with_the_ids_it_replaces(
        self, bench: Bench
    ) -> None:
        seen: list[tuple[str, int, int, tuple[str, ...]]] = []

        async def handle(self: EventConsumer, event: Event) -> None:
            fields = event.data["FIELDS"]
            seen.append((fields["ID"], int(fields["SEQ"]), event.attempt, event.replaces))
            if fields["ID"] == "1" and event.attempt == 1:
                raise Retry("a retry of the coalesced delivery")

        cls = consumer(
            bench.name("coalesced"),
            ("ONCRMDEALUPDATE",),
            handle,
            prefetch=8,
            retry_delays_s=(0.3,),
            ordering_key="data.FIELDS.ID",
            coalesce=True,
        )
        await bench.transport.declare([cls])
        events = keyed(4, retry_at=99, keys=("1", "2"))  # 1: seq 0, 2, 4, 6; 2: 1, 3, 5, 7
        ids = [e.message_id for e in events]
        await publish(bench, events)
        async with Worker(bench.settings, [cls]):
            await wait_until(lambda: len(seen) == 3, 30, "three deliveries")
            await asyncio.sleep(0.5)  # and no more
        # Key 1: the latest with the three before it, failed, then again the same (attempt 2);
        # key 2: the latest with its three. Eight events, three handler calls.
        assert sorted(seen) == [
            ("1", 6, 1, (ids[0], ids[2], ids[4])),
            ("1", 6, 2, (ids[0], ids[2], ids[4])),
            ("2", 7, 1, (ids[1], ids[3], ids[5])),
        ], seen
        assert await left_in(bench, cls.queue) == (0, 0, 0, 0)  # the replaced ones settled

    async def test_a_coalesced_delivery_rejected_dead_letters_every_event_in_it(
        self, bench: Bench
    ) -> None:
        calls: list[tuple[str, ...]] = []

        async def handle(self: EventConsumer, event: Event) -> None:
            calls.append(event.replaces)
            raise Reject("bad deal")

        cls = consumer(
            bench.name("coalreject"),
            ("ONCRMDEALUPDATE",),
            handle,
            ordering_key="data.FIELDS.ID",
            coalesce=True,
        )
        await bench.transport.declare([cls])
        events = keyed(3, retry_at=99, keys=("9",))
        await publish(bench, events)
        async with Worker(bench.settings, [cls]):
            await wait_until(lambda: len(calls) == 1, 30, "the delivery")
            await asyncio.sleep(0.3)
        assert calls == [tuple(e.message_id for e in events[:2])]
        assert await left_in(bench, cls.queue) == (0, 0, 0, 3)
        async with bench.transport.dead_letters(cls.queue) as dlq:
            _, letters = await dlq.list(10)
        # In the order accepted, each with the error.
        assert [d.message_id for d in letters] == [e.message_id for e in events]
        assert all(d.reason == "rejected" for d in letters), letters

    @pytest.mark.fault
    async def test_a_worker_killed_mid_coalesce_loses_nothing(
        self, bench: Bench, tmp_path: Path
    ) -> None:
        record = tmp_path / "record.txt"
        env = {"B24QT_ORDERING": "strict", "B24QT_PREFETCH": "4", "B24QT_COALESCE": "1"}
        recorder = "tests.support.consumers:OrderRecorder"
        first = await start_worker(bench, record, 1.0, recorder, **env)
        events = keyed(5, retry_at=99, keys=("7",))
        ids = tuple(e.message_id for e in events)
        await publish(bench, events)
        await wait_until(lambda: len(read_lines(record)) >= 1, 30, "the first delivery started")
        second = await start_worker(bench, record, 0.0, recorder, **env)
        first.kill()
        await first.wait()
        try:
            await wait_until(lambda: len(read_lines(record)) >= 3, 60, "delivered again")
            await asyncio.sleep(0.5)
            left = await left_in(bench, bench.name("proc"))
        finally:
            second.send_signal(signal.SIGTERM)
            await asyncio.wait_for(second.wait(), 30)
        got = [(line[0], line[3], replaced) for line, replaced in read_coalesced(record)]
        # Killed mid-handler: the same delivery again once its lease ran out (the latest, the
        # four before it), handled once; nothing left in the queue, nothing in its DLQ.
        assert got == [
            ("start", 4, ids[:4]),
            ("start", 4, ids[:4]),
            ("done", 4, ids[:4]),
        ], got
        assert left == (0, 0, 0, 0)


@pytest.mark.broker
class OrderingUpgradeScenarios:
    """A queue made before order keys (schema 3) upgrades in place with events waiting: none
    lost, each keyed by the first ordered claim that meets it, handled in order. Each transport
    says how to take its queue back to schema 3 (`to_schema_3`)."""

    async def to_schema_3(self, bench: Bench) -> None:
        raise NotImplementedError

    async def test_upgrade_in_place_with_events_waiting(self, bench: Bench) -> None:
        lines: list[Line] = []
        cls = ordered_consumer(bench, "upgraded", lines, "strict")
        await bench.transport.declare([cls])
        events = keyed(6)
        await publish(bench, events)
        await self.to_schema_3(bench)
        async with Worker(bench.settings, [cls]):
            await wait_until(
                lambda: sum(k == "done" for k, *_ in lines) == len(events), 30, "all handled"
            )
        assert sorted(seq for k, _, _, seq in lines if k == "done") == list(range(len(events)))
        assert_one_at_a_time(lines)
        assert_order(lines, True, retried_seq(events))
