"""Token buckets: bounding what callers can make us spend (outbound calls, log lines). Standard
library only; the caller passes the clock, so tests need no sleeps."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """`capacity` calls at once, refilled at `per_s`. The caller passes the time (tests need no
    sleeps)."""

    __slots__ = ("_capacity", "_per_s", "_stamp", "_tokens")

    def __init__(self, capacity: float, per_s: float, now: float) -> None:
        self._capacity, self._per_s = capacity, per_s
        self._tokens, self._stamp = capacity, now

    def take(self, now: float) -> bool:
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(self._capacity, self._tokens + elapsed * self._per_s)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def wait_s(self, now: float) -> float:
        """Seconds from `now` until a call would be let through (0 if one would be now)."""
        tokens = self._tokens + max(0.0, now - self._stamp) * self._per_s
        return max(0.0, (1 - tokens) / self._per_s)

    def full_at(self) -> float:
        """When the bucket is full again if nothing more is taken: from then on it is no
        different from a new one."""
        return self._stamp + (self._capacity - self._tokens) / self._per_s


class KeyedLimiter:
    """One `TokenBucket` per key, at most `max_keys` of them, O(1) a call: the keys come from
    callers, so the table must not grow with them.

    A bucket that has refilled is forgotten (a new one would be the same): up to two a call, the
    least recently used first, so the table holds about the keys seen within one refill time. If
    it still reaches `max_keys`, the least recently used key goes, refilled or not: forgetting a
    key only refills its bucket early, and it is the key idle the longest."""

    def __init__(
        self, capacity: float, per_s: float, max_keys: int, clock: Callable[[], float]
    ) -> None:
        self._capacity, self._per_s, self._max_keys = capacity, per_s, max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> bool:
        now = self._clock()
        self._forget_full(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._capacity, self._per_s, now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def wait_s(self, key: str) -> float:
        """Seconds until `take(key)` would be let through (0 for a key not in the table)."""
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None else bucket.wait_s(self._clock())

    def _forget_full(self, now: float) -> None:
        for _ in range(2):
            oldest = next(iter(self._buckets.values()), None)
            if oldest is None or oldest.full_at() > now:
                return
            self._buckets.popitem(last=False)


class LogBudget:
    """At most `burst` log lines at once, then `per_s`: a flood of refusals must not flood the
    log. `spend()` is None when this line is to be dropped, else how many were dropped before
    it (to say so in the line)."""

    def __init__(self, burst: float, per_s: float, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._bucket = TokenBucket(burst, per_s, clock())
        self._dropped = 0

    def spend(self) -> int | None:
        if not self._bucket.take(self._clock()):
            self._dropped += 1
            return None
        dropped, self._dropped = self._dropped, 0
        return dropped
