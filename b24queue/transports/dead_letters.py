"""A dead letter as an operator sees it (what `DeadLetters.list` returns, `b24queue dlq`),
described from its message's headers, and the headers a replayed message starts over with. How
it is shown: b24queue.cli.dlq."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from b24queue import _constants as c

# Headers that describe one failure history; a replayed message starts a new one.
_FAILURE_HEADERS = (
    c.H_ATTEMPT,
    c.H_FIRST_FAILED_AT,
    c.H_LAST_FAILED_AT,
    c.H_ERROR_TYPE,
    c.H_ERROR_MESSAGE,
    c.H_DEAD_LETTER_REASON,
    c.H_ORIGINAL_QUEUE,
    c.H_ORIGINAL_ROUTING_KEY,
    c.H_WORKFLOW_TOLD,
    c.DELIVERY_COUNT,
)
H_REPLAYS = "x-b24queue-replays"
H_REPLAYED_AT = "x-b24queue-replayed-at"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered (or unrouted) event as an operator sees it; never its body."""

    message_id: str | None
    event: str
    domain: str | None
    member_id: str | None
    reason: str
    attempts: int | None
    error: str
    first_failed_at: str | None
    last_failed_at: str | None
    original_queue: str | None
    published_at: str | None
    size_bytes: int
    # A robot's or activity's call: what its workflow was told when it was dead-lettered.
    workflow_told: str | None = None


def letter(
    headers: Mapping[str, Any],
    *,
    message_id: str | None,
    event: str,
    published_at: datetime | None,
    size_bytes: int,
) -> DeadLetter:
    """A dead letter described from its headers (ours, and the broker's where there are some)."""
    h = headers
    reason = _str(h.get(c.H_DEAD_LETTER_REASON) or h.get("x-first-death-reason")) or "unrouted"
    error_type, error_message = _str(h.get(c.H_ERROR_TYPE)), _str(h.get(c.H_ERROR_MESSAGE))
    error = f"{error_type}: {error_message}" if error_type else ""
    if not error and reason == "delivery_limit":
        error = "delivered too often without an ack (did the worker crash on it?)"
    attempt = h.get(c.H_ATTEMPT)
    return DeadLetter(
        message_id=message_id,
        event=_str(h.get(c.H_ORIGINAL_ROUTING_KEY)) or event,
        domain=_str(h.get(c.H_DOMAIN)),
        member_id=_str(h.get(c.H_MEMBER_ID)),
        reason=reason,
        attempts=int(attempt)
        if isinstance(attempt, int | str) and str(attempt).isdigit()
        else None,
        error=error,
        first_failed_at=_str(h.get(c.H_FIRST_FAILED_AT)),
        last_failed_at=_str(h.get(c.H_LAST_FAILED_AT)),
        original_queue=_str(h.get(c.H_ORIGINAL_QUEUE)) or _str(h.get("x-first-death-queue")),
        published_at=published_at.isoformat() if published_at else None,
        size_bytes=size_bytes,
        workflow_told=_str(h.get(c.H_WORKFLOW_TOLD)),
    )


def fresh_history(headers: Mapping[str, Any]) -> dict[str, Any]:
    """A replayed message's headers: its failure history dropped, the replay counted."""
    out = {
        k: v
        for k, v in headers.items()
        if k not in _FAILURE_HEADERS and not k.startswith(c.BROKER_HEADER_PREFIXES)
    }
    previous = out.get(H_REPLAYS, 0)
    out[H_REPLAYS] = (previous if isinstance(previous, int) else 0) + 1
    out[H_REPLAYED_AT] = datetime.now(UTC).isoformat(timespec="milliseconds")
    return out


def _str(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
