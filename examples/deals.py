"""Deals: reads the deal each event names from its portal, and shows acking, retrying with
backoff and rejecting to the dead-letter queue.

`self.portal(event)` is a REST client for the event's portal, with that portal's own tokens
(kept from its ONAPPINSTALL, refreshed when they expire: set B24QUEUE_APP_CLIENT_ID and
B24QUEUE_APP_CLIENT_SECRET), paced by the portal's rate limit across every worker process.

Try it (with `make run` going):
    b24queue send ONCRMDEALADD --field 'data[FIELDS][ID]=42'    # handled, acked
    b24queue send ONCRMDEALADD --field 'data[FIELDS][ID]=0'     # rejected: straight to the DLQ
    b24queue send ONCRMDEALUPDATE --field 'data[FIELDS][ID]=13' # fails twice, then succeeds
(`b24queue send`'s sample portal is not installed here, so its deals are not read: logged.)
"""

from __future__ import annotations

import logging
from collections import Counter

from b24queue import Event, EventConsumer, PortalError, Reject, Retry

log = logging.getLogger(__name__)


class DealSync(EventConsumer):
    queue = "example.deal-sync"
    events = ("ONCRMDEALADD", "ONCRMDEALUPDATE")
    prefetch = 32
    max_attempts = 4
    retry_delays_s = (1, 5, 30)

    def __init__(self) -> None:
        self._tries: Counter[str] = Counter()

    async def handle(self, event: Event) -> None:
        fields = event.data.get("FIELDS", {}) if isinstance(event.data, dict) else {}
        deal_id = str(fields.get("ID", ""))
        if not deal_id.isdigit() or deal_id == "0":
            # Retrying cannot fix a bad id: dead-letter it for a human to look at.
            raise Reject(f"no usable deal id: {deal_id!r}")
        if deal_id == "13":
            # Stands in for a flaky dependency: fails twice, then works.
            self._tries[event.message_id or ""] += 1
            if self._tries[event.message_id or ""] < 3:
                raise Retry("portal busy (simulated)", delay_s=1)
        try:
            deal = await self.portal(event).call("crm.deal.get", {"id": deal_id})
        except PortalError as exc:
            if exc.code == "NO_CREDENTIALS":
                # A portal not installed here (or uninstalled since): nothing to sync with.
                log.warning("deal %s: its portal is not installed, not read", deal_id)
                return
            if exc.code == "NOT_FOUND":
                raise Reject(f"deal {deal_id} no longer exists") from exc
            # Anything else is retried; over the portal's limits the error itself is a Retry
            # carrying its delay (PortalRetry).
            raise
        title = deal.get("TITLE") if isinstance(deal, dict) else None
        log.info("deal %s synced: %r (%s, attempt %d)", deal_id, title, event.name, event.attempt)
