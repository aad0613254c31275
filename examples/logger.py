"""A consumer of every event that logs one line per event (never the tokens)."""

from __future__ import annotations

import logging

from b24queue import Event, EventConsumer

log = logging.getLogger(__name__)


class EventLogger(EventConsumer):
    queue = "example.event-log"
    events = ("#",)  # every event the portal sends
    prefetch = 64

    async def handle(self, event: Event) -> None:
        log.info(
            "%s from %s (handler %s, attempt %d)",
            event.name,
            event.auth.domain,
            event.event_handler_id,
            event.attempt,
        )
