"""The cap on the unrouted queue (`B24QUEUE_UNROUTED_MAX_EVENTS`, `B24QUEUE_UNROUTED_MAX_BYTES`,
the bytes being the events' bodies): past either, the oldest events in it are dropped.

Why the oldest, rather than refusing new ones: a refused event is a 503 at the ingress, and
Bitrix24 does not resend it, whichever queue it was meant for; the unrouted queue only holds events
nobody consumes yet (kept so that `b24queue dlq replay` can send them on once a consumer binds).
Dropping its oldest keeps the ingress answering 200 for everything else, and bounds what one
tenant can make it store.

RabbitMQ drops them itself (a policy on the unrouted queue, `overflow: drop-head`) and Kafka by its
topic's `retention.bytes`; the database and Redis transports keep a ledger of the unrouted queue
(events and bytes, changed with every write to it) and drop the oldest in the same transaction or
script as the publish that went past the cap (PostgreSQL: in a transaction of its own, once past
the cap by a 64th of it), so a publish costs the same however full it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from b24queue.limits import LogBudget
from b24queue.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

LOG_EVERY_S = 10.0  # a flood of drops is one line per this long, saying how many


class UnroutedCap:
    """One publisher's view of the cap: which of the oldest events to drop, and the account of
    what it dropped (a log line at most every `LOG_EVERY_S`, and `on_dropped`: the metric)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.queue = settings.unrouted
        self.max_events = settings.unrouted_max_events
        self.max_bytes = settings.unrouted_max_bytes
        self.on_dropped: Callable[[int], None] | None = None
        self._log = LogBudget(1, 1 / LOG_EVERY_S, clock)
        self._unlogged: tuple[int, int | None] = (0, 0)

    def over(self, events: int, size: int) -> bool:
        return events > self.max_events or size > self.max_bytes

    def far_over(self, events: int, size: int) -> bool:
        """Over by a 64th of the cap (at least one event): where dropping costs a commit of its
        own (PostgreSQL), it is made for many events at once, down to the cap."""
        return events > self.max_events * 65 // 64 or size > self.max_bytes * 65 // 64

    def oldest_to_drop(
        self, oldest: Sequence[tuple[T, int]], events: int, size: int
    ) -> list[tuple[T, int]]:
        """Of `oldest` ((id, body bytes), oldest first) of a queue holding `events` events of
        `size` bytes, the first ones to drop so that what is left is within the cap (all of them
        when that is not enough)."""
        drop: list[tuple[T, int]] = []
        for item in oldest:
            if not self.over(events, size):
                break
            drop.append(item)
            events, size = events - 1, size - item[1]
        return drop

    def dropped(self, events: int, size: int | None) -> None:
        """Account for `events` events (`size` bytes; None: not known) dropped from the
        unrouted queue."""
        if events <= 0:
            return
        if self.on_dropped is not None:
            self.on_dropped(events)
        known = self._unlogged[1]
        total = None if size is None or known is None else size + known
        events += self._unlogged[0]
        if self._log.spend() is None:
            self._unlogged = (events, total)
            return
        self._unlogged = (0, 0)
        log.warning(
            "dropped the %d oldest event(s)%s of the unrouted queue %r: it holds at most %d "
            "events and %d bytes (B24QUEUE_UNROUTED_MAX_EVENTS, B24QUEUE_UNROUTED_MAX_BYTES). "
            "Nobody is bound to these events: bind a consumer to them, or raise the cap",
            events,
            "" if total is None else f" ({total} bytes)",
            self.queue,
            self.max_events,
            self.max_bytes,
        )
