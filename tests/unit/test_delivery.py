"""The delivery rules, through the public testing helper (no broker)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from datetime import UTC, datetime, timedelta

import pytest

from b24queue import Event, EventConsumer, Reject, Retry
from b24queue import _constants as c
from b24queue.delivery import Incoming, Outcome, _log_outcome, decide, process
from b24queue.idempotency import MemorySeenStore
from b24queue.telemetry import logs
from b24queue.telemetry.metrics import WorkerMetrics
from b24queue.testing import event_from_form, make_event, run_handler, run_until_settled
from tests.support.samples import SAMPLE_TOKEN, sample_form


class Flaky(EventConsumer):
    queue = "flaky"
    events = ("ONCRMDEALADD",)
    max_attempts = 5
    retry_delays_s = (1, 5, 30)

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.seen: list[int] = []

    async def handle(self, event: Event) -> None:
        self.seen.append(event.attempt)
        if len(self.seen) <= self.failures:
            raise RuntimeError(f"boom {len(self.seen)} token={event.auth.access_token}")


class Rejecting(EventConsumer):
    queue = "rejecting"
    events = ("#",)

    async def handle(self, event: Event) -> None:
        raise Reject("bad deal")


class AsksForDelay(EventConsumer):
    queue = "asks"
    events = ("#",)
    retry_delays_s = (1, 10, 60)

    async def handle(self, event: Event) -> None:
        raise Retry("later", delay_s=7)


class Slow(EventConsumer):
    queue = "slow"
    events = ("#",)
    handle_timeout_s = 0.05

    async def handle(self, event: Event) -> None:
        await asyncio.Event().wait()


async def test_returning_acks() -> None:
    outcome = await run_handler(Flaky(0), event_from_form(sample_form("crm-deal-add")))
    assert outcome.acked and outcome.attempt == 1


class Sees(EventConsumer):
    queue = "sees"
    events = ("ONIMBOTMESSAGEADD",)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Event] = []

    async def handle(self, event: Event) -> None:
        self.seen.append(event)


async def test_run_handler_hands_the_event_as_queued_without_its_tokens() -> None:
    """b24queue.testing gives a handler what a worker would: the body as the ingress queues it."""
    consumer = Sees()
    bot = {"BOT": {"7": {"application_token": SAMPLE_TOKEN, "AUTH": {"application_token": "x"}}}}
    await run_handler(consumer, make_event("ONIMBOTMESSAGEADD", bot))
    [event] = consumer.seen
    assert "application_token" not in json.dumps(event.payload)


async def test_the_shared_ack_outcome_cannot_be_changed_through_its_headers() -> None:
    """Acks on a first attempt share one outcome: a change to its headers would reach them all."""
    first = await run_handler(Flaky(0), make_event("ONX"))
    second = await run_handler(Flaky(0), make_event("ONY"))
    assert first is second and first.headers == {}
    for change in (
        lambda h: h.__setitem__("x", 1),
        lambda h: h.update(x=1),
        lambda h: h.setdefault("x", 1),
    ):
        with pytest.raises(TypeError):
            change(first.headers)
    assert second.headers == {}


async def test_fails_twice_then_succeeds_with_the_configured_delays() -> None:
    consumer = Flaky(2)
    outcomes = await run_until_settled(consumer, make_event("ONCRMDEALADD"))
    assert [o.kind for o in outcomes] == ["retry", "retry", "ack"]
    assert [o.delay_s for o in outcomes[:2]] == [1, 5]
    assert consumer.seen == [1, 2, 3]


async def test_always_failing_ends_dead_lettered_after_max_attempts() -> None:
    event = event_from_form(sample_form("crm-deal-add"))
    outcomes = await run_until_settled(Flaky(99), event)
    assert [o.kind for o in outcomes] == ["retry"] * 4 + ["dead_letter"]
    assert [o.delay_s for o in outcomes[:4]] == [1, 5, 30, 30]
    last = outcomes[-1]
    assert last.reason == "max_attempts"
    h = last.headers
    assert h[c.H_ATTEMPT] == 5
    assert h[c.H_ERROR_TYPE] == "RuntimeError"
    # The body leaves the event's OAuth tokens out: a handler has none to quote.
    assert h[c.H_ERROR_MESSAGE] == "boom 5 token=None"
    assert h[c.H_ORIGINAL_QUEUE] == "flaky"
    assert h[c.H_ORIGINAL_ROUTING_KEY] == "ONCRMDEALADD"
    assert h[c.H_FIRST_FAILED_AT] == outcomes[0].headers[c.H_FIRST_FAILED_AT]
    assert h[c.H_LAST_FAILED_AT] >= h[c.H_FIRST_FAILED_AT]


async def test_reject_dead_letters_at_once() -> None:
    outcome = await run_handler(Rejecting(), make_event("ONX"))
    assert outcome.dead_lettered
    assert outcome.reason == "rejected"
    assert outcome.headers[c.H_ERROR_MESSAGE] == "bad deal"


async def test_retry_delay_is_rounded_up_to_a_declared_level() -> None:
    outcome = await run_handler(AsksForDelay(), make_event("ONX"))
    assert outcome.retried and outcome.delay_s == 10


async def test_handler_timeout_is_a_failed_attempt() -> None:
    outcome = await run_handler(Slow(), make_event("ONX"))
    assert outcome.retried
    assert outcome.headers[c.H_ERROR_TYPE] == "TimeoutError"


async def test_a_cancellation_from_outside_stays_one_under_the_handler_timeout() -> None:
    """As with asyncio.timeout: only the timeout's own cancellation becomes a TimeoutError; a
    worker stopping (its task cancelled) cancels the handler, and the attempt is not counted."""
    started = asyncio.Event()

    class Waits(EventConsumer):
        queue = "waits"
        events = ("#",)
        handle_timeout_s = 30.0

        async def handle(self, event: Event) -> None:
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(run_handler(Waits(), make_event("ONX")))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_handler_that_swallows_its_timeout_is_acked_and_its_task_goes_on() -> None:
    class Swallows(EventConsumer):
        queue = "swallows"
        events = ("#",)
        handle_timeout_s = 0.05

        async def handle(self, event: Event) -> None:
            with contextlib.suppress(asyncio.CancelledError):  # as a handler should not
                await asyncio.Event().wait()

    outcome = await run_handler(Swallows(), make_event("ONX"))
    assert outcome.acked
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0
    await asyncio.sleep(0.1)  # nothing cancels this task later: the timer went with the handler


async def test_a_handler_within_its_timeout_leaves_no_timer_behind() -> None:
    class Quick(EventConsumer):
        queue = "quick"
        events = ("#",)
        handle_timeout_s = 0.05

        async def handle(self, event: Event) -> None:
            await asyncio.sleep(0)

    for _ in range(3):
        assert (await run_handler(Quick(), make_event("ONX"))).acked
    await asyncio.sleep(0.1)  # a timer left running would cancel this test's task here


async def test_undecodable_bodies_are_dead_lettered_at_once() -> None:
    for body in (b"not json", b"[1,2]", json.dumps({"event": "bad..name"}).encode()):
        incoming = Incoming(body=body, message_id="m", routing_key="X", headers={})
        outcome = await decide(Flaky(0), incoming, "flaky")
        assert outcome.dead_lettered and outcome.reason == "undecodable", body


async def test_broker_history_headers_are_not_carried_on() -> None:
    incoming = Incoming(
        body=json.dumps(make_event("ONX").payload).encode(),
        message_id="m",
        routing_key="ONX",
        headers={"x-death": [{"count": 1}], "x-delivery-count": 2, "x-b24-domain": "d"},
    )
    outcome = await decide(Flaky(1), incoming, "flaky")
    assert "x-death" not in outcome.headers and "x-delivery-count" not in outcome.headers
    assert outcome.headers["x-b24-domain"] == "d"


async def test_event_carries_delivery_facts() -> None:
    seen: list[Event] = []

    class Spy(EventConsumer):
        queue = "spy"
        events = ("#",)

        async def handle(self, event: Event) -> None:
            seen.append(event)

    await run_handler(Spy(), make_event("ONX"), attempt=3, message_id="abc")
    assert (seen[0].message_id, seen[0].attempt) == ("abc", 3)


class _Settled:
    async def settle(self, incoming: Incoming, outcome: Outcome) -> None:
        pass


def _incoming(consumer: EventConsumer, message_id: str | None = "m-1") -> Incoming:
    body = json.dumps(make_event("ONCRMDEALADD").payload).encode()
    return Incoming(body=body, message_id=message_id, routing_key="ONCRMDEALADD", headers={})


async def test_the_wait_before_a_first_attempt_is_observed_per_queue() -> None:
    """From the ingress's acceptance to the start of handling, into the worker's histogram of
    the queue: first attempts only (a retry's wait includes the delay it was given), and only
    when the transport says when the event was accepted."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    metrics = WorkerMetrics()
    first = _incoming(Flaky(0))
    accepted = datetime.now(UTC) - timedelta(seconds=2)
    retry = dataclasses.replace(first, headers={c.H_ATTEMPT: 2}, accepted_at=accepted)
    for incoming in (dataclasses.replace(first, accepted_at=accepted), retry, first):
        await process(Flaky(0), incoming, "q1", _Settled(), metrics.observe)
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
        if s.name.startswith("b24queue_worker_wait_seconds") and s.labels["queue"] == "q1"
    }
    assert samples[("b24queue_worker_wait_seconds_count", None)] == 1
    assert 2 <= samples[("b24queue_worker_wait_seconds_sum", None)] < 2.5
    assert samples[("b24queue_worker_wait_seconds_bucket", "1.0")] == 0
    assert samples[("b24queue_worker_wait_seconds_bucket", "2.5")] == 1


@pytest.mark.parametrize(
    ("consumer", "level", "text"),
    [
        (Flaky(0), logging.INFO, "outcome=ack duration_ms={ms}"),
        (Flaky(1), logging.WARNING, "outcome=retry duration_ms={ms} delay_s=1 error=RuntimeError"),
        (
            Rejecting(),
            logging.WARNING,
            "outcome=dead_letter duration_ms={ms} reason=rejected error=Reject",
        ),
    ],
)
async def test_one_log_line_per_outcome_with_its_fields(
    consumer: EventConsumer, level: int, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What operators read and filter on: the same words and record fields for every event."""
    with caplog.at_level(logging.INFO, logger="b24queue.delivery"):
        outcome = await process(consumer, _incoming(consumer), "q1", _Settled())
    [record] = [r for r in caplog.records if r.name == "b24queue.delivery"]
    assert record.levelno == level
    fields = {k: getattr(record, k) for k in ("event", "queue", "message_id", "attempt", "outcome")}
    assert fields == {
        "event": "ONCRMDEALADD",
        "queue": "q1",
        "message_id": "m-1",
        "attempt": 1,
        "outcome": outcome.kind,
    }
    ms = record.duration_ms
    assert isinstance(ms, float) and ms == round(ms, 1)
    head = "event=ONCRMDEALADD queue=q1 message_id=m-1 attempt=1 "
    assert record.getMessage() == head + text.format(ms=ms)
    error = None if outcome.error is None else type(outcome.error).__name__
    assert getattr(record, "error", None) == error
    assert record.funcName == "_log_outcome" and record.filename == "delivery.py"


async def test_a_duplicate_says_why_it_was_acked(caplog: pytest.LogCaptureFixture) -> None:
    class Seen:
        async def seen(self, key: str) -> bool:
            return True

        async def remember(self, key: str) -> None:
            raise AssertionError("not handled, not remembered")

    class Guarded(Flaky):
        idempotency = Seen()  # type: ignore[assignment]

    with caplog.at_level(logging.INFO, logger="b24queue.delivery"):
        await process(Guarded(0), _incoming(Flaky(0), message_id=None), "q1", _Settled())
        await process(Guarded(0), _incoming(Flaky(0)), "q1", _Settled())
    first, second = (r.getMessage() for r in caplog.records if r.name == "b24queue.delivery")
    assert first.startswith("event=ONCRMDEALADD queue=q1 message_id=None attempt=1 outcome=ack ")
    assert not first.endswith("reason=duplicate")
    assert second.endswith(" reason=duplicate")


def test_the_outcome_line_in_json_carries_its_fields(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        logs.configure("INFO", "json")
        incoming = _incoming(Flaky(0))
        _log_outcome(incoming, "q1", Outcome("ack", 2), 0.01234)
        line = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    record = json.loads(line)
    assert record["msg"] == (
        "event=ONCRMDEALADD queue=q1 message_id=m-1 attempt=2 outcome=ack duration_ms=12.3"
    )
    assert {k: record[k] for k in ("event", "queue", "message_id", "attempt", "outcome")} == {
        "event": "ONCRMDEALADD",
        "queue": "q1",
        "message_id": "m-1",
        "attempt": 2,
        "outcome": "ack",
    }
    assert record["duration_ms"] == 12.3 and record["level"] == "INFO"


async def test_a_delivery_that_replaces_others_is_handled_though_its_latest_was_seen() -> None:
    """Coalescing: the latest event was handled and remembered but its ack was lost; earlier
    events coalesced into it since were never handled. The guard must not ack them unhandled."""

    handled: list[tuple[str, ...]] = []
    store = MemorySeenStore()

    class Guarded(EventConsumer):
        queue = "q"
        events = ("#",)
        idempotency = store

        async def handle(self, event: Event) -> None:
            handled.append(event.replaces)

    body = json.dumps(make_event("ONCRMDEALUPDATE", {"FIELDS": {"ID": "1"}}).payload).encode()
    await store.remember("q:latest")
    alone = Incoming(body=body, message_id="latest", routing_key="ONCRMDEALUPDATE", headers={})
    assert (await decide(Guarded(), alone, "q")).reason == "duplicate"
    assert handled == []
    coalesced = dataclasses.replace(alone, replaces=("earlier",))
    outcome = await decide(Guarded(), coalesced, "q")
    assert outcome.kind == "ack" and outcome.reason is None
    assert handled == [("earlier",)]
