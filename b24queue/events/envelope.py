"""What the ingress hands to the broker side: a transport-neutral message, and its port."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from b24queue import _constants as c
from b24queue.errors import BadEventError
from b24queue.events.event import Event


@dataclass(frozen=True, slots=True)
class Envelope:
    message_id: str
    routing_key: str
    body: bytes
    headers: dict[str, str]
    timestamp: datetime
    event_type: str

    def stored(self) -> tuple[str, str, bytes, str, str, str]:
        """Its fields in this order as a store of text and bytes keeps them (the spool, SQLite,
        Redis): the headers as JSON, the timestamp in ISO 8601."""
        headers, timestamp = json.dumps(self.headers), self.timestamp.isoformat()
        return self.message_id, self.routing_key, self.body, headers, timestamp, self.event_type


# The headers are bounded field by field at the edge (`events`); this is the sum, checked again so
# no future header can grow a frame past what the broker takes (its frame_max is 128 KiB).
MAX_HEADER_CHARS = 1024


# The keys whose values are credentials: the application token (verified by the ingress) and the
# OAuth pair Bitrix24 sends with every online event (`auth`, and again in bot events' `data`).
TOKEN_KEYS = frozenset({"application_token", "access_token", "refresh_token"})
# How compact JSON writes such a key, always: the same text inside a string has its quotes
# escaped. A body without one needs no walk (the common event); a rare false alarm costs the walk.
_TOKEN_KEYS_JSON = tuple(f'"{key}":'.encode() for key in sorted(TOKEN_KEYS))


def holds_token_key(body: bytes) -> bool:
    """Whether compact JSON `body` may hold a token key (then walk it: `without_tokens`)."""
    return any(key in body for key in _TOKEN_KEYS_JSON)


def message_body(payload: dict[str, Any]) -> bytes:
    """The decoded event as received, less every token at any depth (`TOKEN_KEYS`): Bitrix24
    puts them in `auth`, and bot and command events repeat them in `data` (`data[BOT][<id>]` and
    its `[AUTH]`, `data[COMMAND][<id>]` likewise, `data[bot][auth]` in imbot v2 events). The
    ingress has verified the application token; anyone allowed to read a queue (or a dead-letter
    queue) could otherwise forge events with it, or call the portal as the app with the OAuth
    pair (a refresh token lasts weeks). A worker calls the portal with the stored credentials."""
    payload = _without_auth_tokens(payload)  # every event's copies, taken out without a walk
    if "offline" in payload:  # only b24queue.offline marks an event so, never a request body
        payload = {k: v for k, v in payload.items() if k != "offline"}
    body = _serialised(payload)
    if holds_token_key(body):  # a copy deeper down: bot and command events
        body = _serialised(without_tokens(payload))
    return body


def _serialised(payload: dict[str, Any]) -> bytes:
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


def without_tokens(node: Any) -> Any:
    """`node` less every key of `TOKEN_KEYS` at any depth of its dicts and lists: the dicts
    and lists on the way to one are copied, the rest shared, `node` untouched. Linear in its size;
    recursive, so for what is bounded in depth: a decoded event nests at most `forms.MAX_DEPTH`
    levels, and what orjson could serialise fewer than 255."""
    items: Iterable[tuple[Any, Any]]
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return node
    copy = None
    for key, value in items:
        if isinstance(value, dict | list):
            stripped = without_tokens(value)
            if stripped is not value:
                copy = node.copy() if copy is None else copy
                copy[key] = stripped
    if isinstance(node, dict) and not TOKEN_KEYS.isdisjoint(node):
        copy = node.copy() if copy is None else copy
        for key in TOKEN_KEYS.intersection(copy):
            del copy[key]
    return node if copy is None else copy


def _without_auth_tokens(payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` less the tokens of `auth`, where every event has them, without a walk."""
    auth = payload.get("auth")
    if not (isinstance(auth, dict) and not TOKEN_KEYS.isdisjoint(auth)):
        return payload
    auth = auth.copy()  # a copy in C, a third of the cost of a comprehension
    for key in TOKEN_KEYS.intersection(auth):
        del auth[key]
    return {**payload, "auth": auth}


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
