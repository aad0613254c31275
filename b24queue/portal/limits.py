"""Bitrix24's per-portal limit, kept on our side: a leaky bucket that drains `drain_per_s`
requests a second and holds `burst` (2/s and 50 on most plans, 5/s and 250 on Enterprise; the
portal counts per portal and per source address). Every worker process on one store shares one
bucket per portal, so 64 handlers in each of several processes together stay under the limit
instead of finding it with 503 QUERY_LIMIT_EXCEEDED.

A call *reserves* its place: the bucket's level goes up by one at once and the caller is told how
long to wait before sending (level above the burst, divided by the drain rate). Reservations are
served in the order they were made, without polling. A reservation that would wait longer than
`max_wait_s` is not made: the caller retries its event later instead of holding a handler.

The buckets are kept in the state every process on one store shares (b24queue.portal.state),
beside the refresh leases and the methods held by the run-time limit (`operating_hold_s` below).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The portal counts a request when it arrives, not when we reserved its place: requests held up
# (a TLS handshake, a busy event loop) arrive bunched, and the portal's bucket starts draining
# only at the first arrival. The bucket we keep is smaller than the portal's by what half a second
# of such scatter brings, and at least two requests (Bitrix24's 2/s: 2; its 5/s: 2.5).
HEADROOM = 2
SCATTER_S = 0.5


@dataclass(frozen=True, slots=True)
class Limit:
    burst: int
    drain_per_s: float
    max_wait_s: float

    @property
    def capacity(self) -> float:
        return max(1.0, self.burst - max(HEADROOM, self.drain_per_s * SCATTER_S))

    @property
    def idle_s(self) -> float:
        """After this long unused, a bucket is empty (its state can be dropped)."""
        return self.capacity / self.drain_per_s + self.max_wait_s + 1


def reserve(level: float, stamp: float, now: float, limit: Limit) -> tuple[float, float] | None:
    """(new level, seconds to wait) for one more request, or None if it would wait longer than
    `limit.max_wait_s` (nothing reserved). `level` was the bucket's at `stamp`; a clock that went
    back drains nothing."""
    level = max(0.0, level - max(0.0, now - stamp) * limit.drain_per_s)
    wait_s = max(0.0, (level + 1 - limit.capacity) / limit.drain_per_s)
    if wait_s > limit.max_wait_s:
        return None
    return level + 1, wait_s


# Bitrix24's second limit is on run time, per method: when a method's requests on one portal
# (every app and webhook together) have run more than 480 s in the past 10 minutes, the portal
# answers that method 429 OPERATION_TIME_LIMIT until the time its answers' `time` block gives as
# `operating_reset_at` (unix seconds); other methods go on. Nobody on our side calls that method
# of that portal before then. The portal's value is bounded: at least a second (a time in the
# past, a clock ahead of ours), at most the 10-minute window; without a usable one, a minute.
# A quarter second more than it says: a call re-sent at that very instant may still be refused.
OPERATING_MARGIN_S = 0.25
OPERATING_WINDOW_S = 600.0
OPERATING_MIN_S = 1.0
OPERATING_DEFAULT_S = 60.0
# Methods held at once per portal (the app's own method names; the soonest free goes first).
MAX_HELD_METHODS = 64


def operating_hold_s(answer: Mapping[str, Any], now: float) -> float:
    """How long the method an OPERATION_TIME_LIMIT `answer` refused stays held from `now`."""
    block = answer.get("time")
    reset = block.get("operating_reset_at") if isinstance(block, dict) else None
    if isinstance(reset, str) and reset.isdigit() and len(reset) <= 12:
        reset = int(reset)
    if isinstance(reset, bool) or not isinstance(reset, int | float) or not math.isfinite(reset):
        return OPERATING_DEFAULT_S
    return min(OPERATING_WINDOW_S, max(OPERATING_MIN_S, reset - now + OPERATING_MARGIN_S))


def method_key(method: str) -> str:
    """Bitrix24's method names ignore case: one hold for crm.deal.list and CRM.DEAL.LIST."""
    return method.lower()
