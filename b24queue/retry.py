"""Backoff: pure functions from attempt numbers to delays."""

from __future__ import annotations


def delay_after(failed_attempt: int, delays_s: tuple[float, ...]) -> float:
    """Wait before the next attempt once attempt `failed_attempt` (1-based) failed.

    `delays_s[0]` comes before attempt 2, `delays_s[1]` before attempt 3, ...; the last repeats.
    """
    if failed_attempt < 1:
        raise ValueError("attempts count from 1")
    return delays_s[min(failed_attempt - 1, len(delays_s) - 1)]


def snap_delay(requested_s: float, available_s: tuple[float, ...]) -> float:
    """The smallest available delay >= the requested one (else the largest).

    Retry queues have one queue-wide TTL each, so a delay a handler asks for (`Retry(delay_s=7)`)
    is served by the next declared level up: never earlier than asked, unless nothing is that long.
    """
    ordered = sorted(available_s)
    for delay in ordered:
        if delay >= requested_s:
            return delay
    return ordered[-1]
