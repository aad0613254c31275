"""How `b24queue dlq list` shows dead letters to an operator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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


def render(source: str, total: int, letters: Sequence[DeadLetter]) -> str:
    if total == 0:
        return f"{source} is empty"
    lines = [f"{source}: {total} message(s); showing {len(letters)}, in queue order", ""]
    for i, x in enumerate(letters, 1):
        attempts = f", {x.attempts} attempt(s)" if x.attempts is not None else ""
        lines.append(f"{i}. {x.event}  message_id={x.message_id}")
        lines.append(f"   portal: {x.domain or '?'} (member_id {x.member_id or '?'})")
        lines.append(f"   why:    {x.reason}{attempts}" + (f" - {x.error}" if x.error else ""))
        if x.first_failed_at:
            lines.append(f"   failed: first {x.first_failed_at}, last {x.last_failed_at}")
        lines.append(f"   sent:   {x.published_at or '?'} ({x.size_bytes} bytes)")
    lines += ["", "replay: b24queue dlq replay <queue> [--id MESSAGE_ID] [--limit N]"]
    return "\n".join(lines)
