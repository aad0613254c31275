"""What the ingress hands to the broker side: a transport-neutral message, and its port."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from b24queue import _constants as c
from b24queue.events import Event


@dataclass(frozen=True, slots=True)
class Envelope:
    message_id: str
    routing_key: str
    body: bytes
    headers: dict[str, str]
    timestamp: datetime
    event_type: str


def envelope_for(event: Event) -> Envelope:
    """The message for an event: body is the decoded event exactly as received."""
    headers = {}
    if event.auth.domain:
        headers[c.H_DOMAIN] = event.auth.domain
    if event.auth.member_id:
        headers[c.H_MEMBER_ID] = event.auth.member_id
    if event.event_handler_id:
        headers[c.H_EVENT_HANDLER_ID] = event.event_handler_id
    return Envelope(
        message_id=uuid.uuid4().hex,
        routing_key=event.routing_key,
        body=json.dumps(event.payload, ensure_ascii=False, separators=(",", ":")).encode(),
        headers=headers,
        timestamp=datetime.now(UTC),
        event_type=event.name,
    )


class EventSink(Protocol):
    """Where accepted events go. `publish` returns only once the event is durable."""

    async def publish(self, envelope: Envelope) -> None:
        """Raise `BrokerUnavailableError` or `PublishError` when the event is not durable."""

    def is_ready(self) -> bool:
        """True while a publish can be expected to succeed."""
