"""What the ingress hands to the broker side: a transport-neutral message, and its port."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from b24queue import _constants as c
from b24queue.errors import BadEventError
from b24queue.events import Event


@dataclass(frozen=True, slots=True)
class Envelope:
    message_id: str
    routing_key: str
    body: bytes
    headers: dict[str, str]
    timestamp: datetime
    event_type: str


# The headers are bounded field by field at the edge (`events`); this is the sum, checked again so
# no future header can grow a frame past what the broker takes (its frame_max is 128 KiB).
MAX_HEADER_CHARS = 1024


def message_body(payload: dict[str, Any]) -> bytes:
    """The decoded event as received, less the application token wherever Bitrix24 puts it
    (`auth[application_token]`; bot events repeat it in `data[BOT][<id>][AUTH]`): the ingress has
    verified it, and anyone allowed to read a queue could otherwise forge events with it."""
    payload = _without_token(payload)
    if "offline" in payload:  # only b24queue.offline marks an event so, never a request body
        payload = {k: v for k, v in payload.items() if k != "offline"}
    data = payload.get("data")
    bots = data.get("BOT") if isinstance(data, dict) else None
    if isinstance(bots, dict) and any(_has_token(b) for b in bots.values()):
        bots = {k: _without_token(b, "AUTH") if _has_token(b) else b for k, b in bots.items()}
        payload = {**payload, "data": {**data, "BOT": bots}}  # type: ignore[dict-item]
    # orjson writes what json.dumps(ensure_ascii=False, separators=(",", ":")) does, byte for
    # byte, but for some floats (1e-05 as 0.00001: the same number), in a 17th of the time.
    try:
        body = orjson.dumps(payload)
    except TypeError:  # e.g. an integer past 64 bits, a lone surrogate: the exact path says
        body = b""
    # orjson writes NaN and the infinities as null, where json refuses them: a body with a null
    # anywhere (a form never has one) takes the exact path, which refuses them as before.
    if not body or b"null" in body:
        body = _exact_body(payload)
    return body


def _exact_body(payload: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN or an infinity that came in some other way than decode_json
        raise BadEventError("the event holds a number that is not JSON (NaN or infinite)") from None
    return text.encode()


def _has_token(node: Any, key: str = "AUTH") -> bool:
    return (
        isinstance(node, dict)
        and isinstance(node.get(key), dict)
        and "application_token" in node[key]
    )


def _without_token(node: Any, key: str = "auth") -> Any:
    """`node` with `node[key]["application_token"]` left out (a copy; the original untouched)."""
    if not _has_token(node, key):
        return node
    return {**node, key: {k: v for k, v in node[key].items() if k != "application_token"}}


def token_digest(token: str) -> str:
    """What a message keeps of its application token (H_TOKEN_DIGEST): enough to tell which
    portal's token it was, useless for forging an event (Bitrix24's tokens are random)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_message_id() -> str:
    """`uuid.uuid4().hex`, without building a UUID object (a third of its cost)."""
    n = int.from_bytes(os.urandom(16), "big")
    n = n & ~(0xC000 << 48) | 0x8000 << 48  # variant RFC 4122
    n = n & ~(0xF000 << 64) | 0x4000 << 64  # version 4
    return f"{n:032x}"


def envelope_for(event: Event) -> Envelope:
    """The message for an event: body is the decoded event as received (see `message_body`)."""
    headers = {}
    if event.auth.domain:
        headers[c.H_DOMAIN] = event.auth.domain
    if event.auth.member_id:
        headers[c.H_MEMBER_ID] = event.auth.member_id
    if event.event_handler_id:
        headers[c.H_EVENT_HANDLER_ID] = event.event_handler_id
    if event.auth.application_token:
        headers[c.H_TOKEN_DIGEST] = token_digest(event.auth.application_token)
    size = sum(len(k) + len(v) for k, v in headers.items()) + len(event.routing_key)
    if size > MAX_HEADER_CHARS:
        raise BadEventError("auth[domain], auth[member_id] and event_handler_id are too long")
    return Envelope(
        message_id=new_message_id(),
        routing_key=event.routing_key,
        body=message_body(event.payload),
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
