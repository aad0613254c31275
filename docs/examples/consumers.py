"""A consumer of every catalog product event: its settings, hooks and the delivery facts."""

import logging

from b24queue import Event, EventConsumer, Retry

log = logging.getLogger(__name__)


class ProductFeed(EventConsumer):
    queue = "product-feed"
    events = ("CATALOG.PRODUCT.ON.*",)  # `*` one word, `#` any number of words
    prefetch = 16  # handle() calls in flight in one worker process
    max_attempts = 8  # attempts in all, then product-feed.dlq
    retry_delays_s = (5, 60, 600)  # three retry levels: 5 s, 1 min, 10 min (the last repeats)
    handle_timeout_s = 120  # a handler still running after 2 min: this attempt failed
    max_deliveries = 20  # deliveries that crash the worker before it goes to the DLQ unhandled

    async def on_start(self) -> None:
        self.handled = 0  # open clients, pools... here, once, before the first event

    async def handle(self, event: Event) -> None:
        if not isinstance(event.data, dict) or "FIELDS" not in event.data:
            # Waits at the shortest declared level of at least 30 s: 60 s, never sooner.
            raise Retry("the product is not readable yet", delay_s=30)
        log.info(
            "%s from %s: message %s, attempt %d%s, accepted at %s, sent at %s",
            event.name,  # "CATALOG.PRODUCT.ON.UPDATE"
            event.auth.domain,
            event.message_id,  # stable across retries: de-duplicate with it
            event.attempt,
            " (redelivered)" if event.redelivered else "",
            event.accepted_at,  # when the ingress took it (a spooled event keeps that time)
            event.ts,  # when the portal sent it
        )
        self.handled += 1

    async def on_stop(self) -> None:
        log.info("%d events handled", self.handled)  # once, after the last event finished
