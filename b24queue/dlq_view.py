"""How `b24queue dlq list` shows dead letters to an operator."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any

from b24queue import _constants as c
from b24queue.terminal import safe

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


def render(source: str, total: int, letters: Sequence[DeadLetter]) -> str:
    source = safe(source)
    if total == 0:
        return f"{source} is empty"
    lines = [f"{source}: {total} message(s); showing {len(letters)}, in queue order", ""]
    for i, x in enumerate(map(_shown, letters), 1):
        attempts = f", {x.attempts} attempt(s)" if x.attempts is not None else ""
        lines.append(f"{i}. {x.event}  message_id={x.message_id}")
        lines.append(f"   portal: {x.domain or '?'} (member_id {x.member_id or '?'})")
        lines.append(f"   why:    {x.reason}{attempts}" + (f" - {x.error}" if x.error else ""))
        if x.first_failed_at:
            lines.append(f"   failed: first {x.first_failed_at}, last {x.last_failed_at}")
        lines.append(f"   sent:   {x.published_at or '?'} ({x.size_bytes} bytes)")
    lines += ["", "replay: b24queue dlq replay <queue> [--id MESSAGE_ID] [--limit N]"]
    return "\n".join(lines)


def _shown(letter: DeadLetter) -> DeadLetter:
    """Every text of a dead letter made safe for the terminal: it comes from the message (an
    error quoting the event's data, a portal's domain)."""
    texts = {f.name: getattr(letter, f.name) for f in fields(letter)}
    shown: dict[str, Any] = {k: safe(v) for k, v in texts.items() if isinstance(v, str)}
    return replace(letter, **shown)
