"""Run a consumer's `handle` without a broker and see what the worker would do.

    from b24queue.testing import make_call, make_event, run_handler, run_until_settled

    outcome = await run_handler(DealSync(), make_event("ONCRMDEALADD", {"FIELDS": {"ID": "1"}}))
    assert outcome.acked                     # or .retried (with .delay_s) or .dead_lettered

    outcomes = await run_until_settled(DealSync(), event)   # every attempt, no waiting
    assert [o.kind for o in outcomes] == ["retry", "retry", "ack"]

    outcome = await run_handler(DealSync(), event)
    [message] = outcome.published            # what the handler published (self.publish)
    assert message.routing_key == "APP.DEAL.RECHECK"
    assert (await run_message(DealRecheck(), message)).acked   # the next consumer gets it

A robot's call: `make_call(GREET, {"who": "Ada"})` (its answer is sent through the consumer's
`portals`, as in the worker). The same rules (`b24queue.delivery.decide`) run here as in the
worker; what a handler publishes is collected in `outcome.published` (an ack only: a failed
attempt publishes nothing), never sent.
"""

from __future__ import annotations

import uuid
from typing import Any

from b24queue import _constants as c
from b24queue.bizproc import Bizproc, Declarations, as_event
from b24queue.consumer import EventConsumer
from b24queue.delivery import Incoming, Outcome, decide
from b24queue.events.envelope import Envelope, envelope_for
from b24queue.events.event import FORM_TYPE, Event, parse_event

TEST_TOKEN = "test-application-token"  # noqa: S105 - a fixture value, not a secret


def make_event(
    name: str, data: Any = None, *, domain: str = "example.bitrix24.com", **auth: str
) -> Event:
    """A Bitrix24-shaped event (values as strings, as the portal sends them)."""
    payload = {
        "event": name,
        "event_handler_id": "1",
        "data": {} if data is None else data,
        "ts": "1764367200",
        "auth": {
            "domain": domain,
            "member_id": "0" * 32,
            "application_token": TEST_TOKEN,
            **auth,
        },
    }
    return Event.from_payload(payload)


def make_call(
    declared: Bizproc,
    properties: dict[str, Any] | None = None,
    *,
    event_token: str = "test-event-token|A1_2_3|x",  # noqa: S107 - a fixture value
    domain: str = "example.bitrix24.com",
    **auth: str,
) -> Event:
    """A robot's or activity's call as the ingress queues it (b24queue.bizproc): Bitrix24's
    fields, and `event` its routing key (`ROBOT.<CODE>`)."""
    payload = {
        "workflow_id": "664a1b2c3d4e5f.12345678",
        "code": declared.code,
        "document_id": ["crm", "CCrmDocumentDeal", "DEAL_1"],
        "document_type": ["crm", "CCrmDocumentDeal", "DEAL"],
        "event_token": event_token,
        "properties": properties or {},
        "ts": "1764367200",
        "auth": {
            "domain": domain,
            "member_id": "0" * 32,
            "application_token": TEST_TOKEN,
            **auth,
        },
    }
    return Event.from_payload(as_event(payload, Declarations([declared])))


def event_from_form(body: bytes | str) -> Event:
    """Decode a form body exactly as the ingress does (e.g. a saved Bitrix24 request)."""
    raw = body.encode() if isinstance(body, str) else body
    return parse_event(FORM_TYPE, raw)


async def run_handler(
    consumer: EventConsumer,
    event: Event,
    *,
    attempt: int = 1,
    message_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> Outcome:
    """One delivery of `event` as attempt `attempt`; returns the outcome, acts on nothing."""
    type(consumer).check()
    consumer.outbox_publisher = None  # collected in the outcome, never sent
    # As the ingress queues it: the body without the application token, its digest in a header.
    envelope = envelope_for(event)
    incoming = Incoming(
        body=envelope.body,
        message_id=message_id or uuid.uuid4().hex,
        routing_key=envelope.routing_key,
        headers={**envelope.headers, **(headers or {}), c.H_ATTEMPT: attempt},
    )
    return await decide(consumer, incoming, type(consumer).queue)


async def run_message(consumer: EventConsumer, message: Envelope, *, attempt: int = 1) -> Outcome:
    """One delivery of a message as it would be queued (one of `outcome.published`): the next
    consumer of a chain gets its portal, `caused_by` and `correlation_id` as in a worker."""
    type(consumer).check()
    consumer.outbox_publisher = None
    incoming = Incoming(
        body=message.body,
        message_id=message.message_id,
        routing_key=message.routing_key,
        headers={**message.headers, c.H_ATTEMPT: attempt},
    )
    return await decide(consumer, incoming, type(consumer).queue)


async def run_until_settled(consumer: EventConsumer, event: Event) -> list[Outcome]:
    """Deliver `event` again after every retry (without waiting the delays) until it is acked or
    dead-lettered; returns every attempt's outcome."""
    outcomes: list[Outcome] = []
    message_id = uuid.uuid4().hex
    headers: dict[str, Any] = {}
    attempt = 1
    while True:
        outcome = await run_handler(
            consumer, event, attempt=attempt, message_id=message_id, headers=headers
        )
        outcomes.append(outcome)
        if not outcome.retried:
            return outcomes
        headers = dict(outcome.headers)
        attempt += 1
