"""Retries: what a handler raises to retry an event later (`Retry`) or never (`Reject`), and the
backoff, pure functions from attempt numbers to delays."""

from __future__ import annotations


class Reject(Exception):
    """Raise from `handle` to send the event to the dead-letter queue now, without retries."""

    def __init__(self, reason: str = "rejected by handler") -> None:
        super().__init__(reason)


class Retry(Exception):
    """Raise from `handle` to try again later (counts as a failed attempt).

    `delay_s` overrides the configured delay; it is rounded up to the nearest declared retry
    delay (each delay is one retry queue).
    """

    def __init__(self, reason: str = "retry requested by handler", delay_s: float | None = None):
        super().__init__(reason)
        self.delay_s = delay_s


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
