"""Deals: shows acking, retrying with backoff and rejecting to the dead-letter queue.

Try it (with `make run` going):
    b24queue send ONCRMDEALADD --field 'data[FIELDS][ID]=42'    # handled, acked
    b24queue send ONCRMDEALADD --field 'data[FIELDS][ID]=0'     # rejected: straight to the DLQ
    b24queue send ONCRMDEALUPDATE --field 'data[FIELDS][ID]=13' # fails twice, then succeeds
"""

from __future__ import annotations

import logging
from collections import Counter

from b24queue import Event, EventConsumer, Reject, Retry

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
            # Stands in for a flaky REST call: a real handler would call the portal here, and
            # Bitrix24's QUERY_LIMIT_EXCEEDED is exactly the kind of error worth retrying.
            self._tries[event.message_id or ""] += 1
            if self._tries[event.message_id or ""] < 3:
                raise Retry("portal busy (simulated)", delay_s=1)
        log.info("deal %s synced (%s, attempt %d)", deal_id, event.name, event.attempt)
