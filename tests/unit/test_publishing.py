"""What a handler publishes (b24queue.publishing), without a broker: held until the outcome,
ids fixed by the delivery, the portal and chain carried, bad input named."""

from __future__ import annotations

import json
from typing import Any

import pytest

from b24queue import Event, EventConsumer, Producer, PublishInputError, Retry
from b24queue import _constants as c
from b24queue.delivery import Incoming, decide
from b24queue.errors import BadEventError, BrokerUnavailableError, ConfigError
from b24queue.events.envelope import Envelope, envelope_for, token_digest
from b24queue.publishing import Origin, app_envelope, derived_id, from_outside
from b24queue.testing import TEST_TOKEN, make_event, run_handler, run_message, run_until_settled


class Rechecks(EventConsumer):
    queue = "t.rechecks"
    events = ("ONCRMDEALUPDATE",)

    async def handle(self, event: Event) -> None:
        await self.publish("app.deal.recheck", {"id": event.data["FIELDS"]["ID"]}, key="recheck")
        await self.publish("APP.DEAL.SYNC_CONTACTS", {"id": event.data["FIELDS"]["ID"]})


class FailsOnce(EventConsumer):
    queue = "t.fails-once"
    events = ("ONCRMDEALUPDATE",)

    async def handle(self, event: Event) -> None:
        await self.publish("APP.DEAL.RECHECK", {"attempt": event.attempt})
        if event.attempt == 1:
            raise Retry("first attempt fails")


def deal() -> Event:
    return make_event("ONCRMDEALUPDATE", {"FIELDS": {"ID": "42"}})


async def test_a_handler_that_returns_has_its_messages_in_the_outcome() -> None:
    outcome = await run_handler(Rechecks(), deal(), message_id="m-1")
    assert outcome.acked
    first, second = outcome.published
    assert (first.routing_key, second.routing_key) == ("APP.DEAL.RECHECK", "APP.DEAL.SYNC_CONTACTS")
    body = json.loads(first.body)
    assert body["event"] == "APP.DEAL.RECHECK" and body["data"] == {"id": "42"}
    assert body["auth"] == {"domain": "example.bitrix24.com", "member_id": "0" * 32}
    assert TEST_TOKEN not in first.body.decode() and "token" not in body["auth"]
    assert first.headers[c.H_MEMBER_ID] == "0" * 32
    assert first.headers[c.H_DOMAIN] == "example.bitrix24.com"
    assert first.headers[c.H_TOKEN_DIGEST] == token_digest(TEST_TOKEN)
    assert first.headers[c.H_CAUSED_BY] == "m-1"
    assert first.headers[c.H_CORRELATION_ID] == "m-1"  # a chain begins at this event


async def test_the_ids_are_fixed_by_delivery_queue_name_and_key_or_order() -> None:
    a = await run_handler(Rechecks(), deal(), message_id="m-1")
    b = await run_handler(Rechecks(), deal(), message_id="m-1")
    c_ = await run_handler(Rechecks(), deal(), message_id="m-2")
    ids = [e.message_id for e in a.published]
    assert ids == [e.message_id for e in b.published]  # a redelivery publishes the same ids
    assert set(ids).isdisjoint(e.message_id for e in c_.published)
    assert len(set(ids)) == 2 and all(len(i) == 32 for i in ids)


async def test_a_failed_attempt_publishes_nothing_and_its_retry_once() -> None:
    outcomes = await run_until_settled(FailsOnce(), deal())
    assert [o.kind for o in outcomes] == ["retry", "ack"]
    assert outcomes[0].published == ()
    [message] = outcomes[1].published
    assert json.loads(message.body)["data"] == {"attempt": 2}


async def test_the_chain_keeps_its_correlation_and_names_its_cause() -> None:
    first = await run_handler(Rechecks(), deal(), message_id="root")
    message = first.published[0]

    seen: dict[str, Any] = {}

    class Next(EventConsumer):
        queue = "t.next"
        events = ("APP.DEAL.RECHECK",)

        async def handle(self, event: Event) -> None:
            seen.update(caused_by=event.caused_by, correlation=event.correlation_id)
            await self.publish("APP.DEAL.AGAIN")

    outcome = await run_message(Next(), message)
    assert seen == {"caused_by": "root", "correlation": "root"}
    [again] = outcome.published
    assert again.headers[c.H_CAUSED_BY] == message.message_id
    assert again.headers[c.H_CORRELATION_ID] == "root"
    assert again.headers[c.H_TOKEN_DIGEST] == token_digest(TEST_TOKEN)  # self.portal works


class Failing:
    """A sink whose publish fails (the queue away)."""

    def __init__(self) -> None:
        self.calls = 0

    async def publish(self, envelope: Envelope) -> None:
        self.calls += 1
        raise BrokerUnavailableError("away")

    def is_ready(self) -> bool:
        return True


class Collecting:
    def __init__(self) -> None:
        self.published: list[Envelope] = []

    async def publish(self, envelope: Envelope) -> None:
        self.published.append(envelope)

    def is_ready(self) -> bool:
        return True


def incoming_of(event: Event, message_id: str = "m-1") -> Incoming:
    envelope = envelope_for(event)
    return Incoming(envelope.body, message_id, envelope.routing_key, envelope.headers)


async def test_messages_are_released_before_the_ack_and_a_failed_release_is_a_retry() -> None:
    consumer = Rechecks()
    sink = Collecting()
    consumer.outbox_publisher = sink
    outcome = await decide(consumer, incoming_of(deal()), "t.rechecks")
    assert outcome.acked and [e.message_id for e in sink.published] == [
        e.message_id for e in outcome.published
    ]
    failing = Failing()
    consumer.outbox_publisher = failing
    outcome = await decide(consumer, incoming_of(deal()), "t.rechecks")
    assert outcome.retried and outcome.published == ()
    assert outcome.headers[c.H_ERROR_TYPE] == "BrokerUnavailableError"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "ONCRMDEALADD"}, "name"),
        ({"name": "APP..X"}, "name"),
        ({"name": "APP.X", "key": ""}, "key"),
        ({"name": "APP.X", "key": "k" * 201}, "key"),
        ({"name": "APP.X", "delay_s": 5}, "delay_s"),
        ({"name": "APP.X", "data": {"x": object()}}, "data"),
        ({"name": "APP.X", "data": "x" * 600_000}, "data"),
    ],
)
async def test_bad_input_is_named(kwargs: dict[str, Any], field: str) -> None:
    class Bad(EventConsumer):
        queue = "t.bad"
        events = ("ONCRMDEALUPDATE",)

        async def handle(self, event: Event) -> None:
            args = dict(kwargs)
            await self.publish(args.pop("name"), args.pop("data", None), **args)

    outcome = await run_handler(Bad(), deal())
    assert outcome.retried and outcome.published == ()
    assert isinstance(outcome.error, PublishInputError) and outcome.error.field == field


async def test_publish_outside_a_handler_is_refused() -> None:
    with pytest.raises(ConfigError, match="Producer"):
        await Rechecks().publish("APP.X")


def test_the_ingress_refuses_the_apps_own_names() -> None:
    with pytest.raises(BadEventError) as caught:
        from_outside(make_event("APP.DEAL.RECHECK"))
    assert caught.value.field == "event"
    assert from_outside(deal()).name == "ONCRMDEALUPDATE"


def test_a_token_in_data_never_reaches_the_body() -> None:
    envelope = app_envelope(
        "APP.X", {"nested": {"access_token": "secret-access"}}, Origin(), derived_id("x")
    )
    assert b"secret-access" not in envelope.body


async def test_producer_needs_async_with(tmp_path: Any) -> None:
    from b24queue.settings import Settings

    producer = Producer(Settings(broker_url=f"sqlite:{tmp_path}/q.sqlite3"))
    with pytest.raises(ConfigError, match="async with"):
        await producer.publish("APP.X")


async def test_producer_finds_an_installed_portal_by_member_id(tmp_path: Any) -> None:
    from b24queue.auth.record import PortalRecord
    from b24queue.auth.store import open_store
    from b24queue.settings import Settings

    store_spec = f"sqlite:{tmp_path}/portals.sqlite3"
    store = open_store(store_spec)
    record = PortalRecord(
        member_id="m1",
        domain="m1.portal.test",
        token="app-token-m1",
        access_token="a",
        access_expires=0,
        refresh_token="r",
        client_endpoint="https://m1.portal.test/rest/",
    )
    assert await store.remember(record)
    await store.close()
    settings = Settings(broker_url=f"sqlite:{tmp_path}/q.sqlite3", portal_store=store_spec)
    producer = Producer(settings)
    origin = await producer._origin("m1")
    assert (origin.domain, origin.member_id) == ("m1.portal.test", "m1")
    assert origin.token_digest == token_digest("app-token-m1")
    with pytest.raises(PublishInputError, match="no installed portal") as caught:
        await producer._origin("m2")
    assert caught.value.field == "portal"
    await producer.__aexit__(None, None, None)  # closes the store it opened
    assert producer._store is None


async def test_the_same_name_and_key_twice_in_one_handler_is_one_message() -> None:
    class Twice(EventConsumer):
        queue = "t.twice"
        events = ("ONCRMDEALUPDATE",)

        async def handle(self, event: Event) -> None:
            a = await self.publish("APP.X", {"n": 1}, key="k")
            b = await self.publish("APP.X", {"n": 2}, key="k")
            c = await self.publish("APP.Y", {"n": 3}, key="k")
            assert a == b != c

    outcome = await run_handler(Twice(), deal())
    assert [json.loads(e.body)["data"] for e in outcome.published] == [{"n": 1}, {"n": 3}]


async def test_a_task_left_running_cannot_publish_after_its_handler() -> None:
    import asyncio

    late: list[BaseException] = []

    class Leaves(EventConsumer):
        queue = "t.leaves"
        events = ("ONCRMDEALUPDATE",)

        async def handle(self, event: Event) -> None:
            async def later() -> None:
                await asyncio.sleep(0.01)
                try:
                    await self.publish("APP.LATE")
                except ConfigError as exc:
                    late.append(exc)

            self.task = asyncio.ensure_future(later())

    consumer = Leaves()
    outcome = await run_handler(consumer, deal())
    await consumer.task
    assert outcome.acked and outcome.published == ()
    assert len(late) == 1 and "has returned" in str(late[0])


class _Unavailable:
    async def publish(self, envelope: Envelope) -> None:
        raise BrokerUnavailableError("the queue is away")


async def test_a_robots_messages_are_durable_before_its_answer_is_kept_or_sent() -> None:
    """A robot's retry only sends the kept answer (the handler does not run again): were the
    answer kept while its messages failed to publish, the retry would never publish them. So the
    messages go first; failing, the attempt keeps no answer and sends none, and its retry runs
    the handler again (same message ids)."""
    from b24queue.bizproc import Property, Robot, RobotConsumer
    from b24queue.testing import make_call

    greet = Robot(
        code="pubgreet",
        name="Greet",
        return_properties={"greeting": Property(name="Greeting")},
    )

    class Greets(RobotConsumer):
        queue = "t.greets"
        bizproc = greet
        max_attempts = 3

        async def handle(self, event: Event) -> dict[str, str]:
            await self.publish("APP.GREETED", {"who": "Ada"})
            return {"greeting": "Hello"}

    Greets.check()
    consumer = Greets()
    consumer.outbox_publisher = _Unavailable()
    envelope = envelope_for(make_call(greet))
    incoming = Incoming(
        body=envelope.body,
        message_id="m1",
        routing_key=envelope.routing_key,
        headers={**envelope.headers, c.H_ATTEMPT: 1},
    )
    outcome = await decide(consumer, incoming, Greets.queue)
    assert outcome.kind == "retry" and isinstance(outcome.error, BrokerUnavailableError)
    assert c.H_BIZPROC_RESULT not in outcome.headers  # no answer kept: the retry runs it again
