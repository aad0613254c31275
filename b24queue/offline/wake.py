"""Each pulled portal's wake-ups: an ONOFFLINEEVENT (through the ingress and the wake queue)
shortens that portal's ordinary poll wait, and nothing else.

The ingress also accepts events with a static token (B24QUEUE_APP_TOKENS) whatever member_id
they name, so a wake counts only when it came with the portal's own application token (the
digest of its stored token). A wake never ends a backoff (the portal's OPERATION_TIME_LIMIT, a
failed pull, a retry delay, the broker away), and it pulls a portal at most once per `QUIET_S`
after its last pull: a wake within that time is kept and takes effect when it is over (no ping is
lost, and a flood of pings costs one pull per `QUIET_S`). State is per portal this process pulls:
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from dataclasses import dataclass, field

QUIET_S = 2.0  # a portal is pulled by wake-ups at most once in this long


@dataclass(slots=True)
class _Portal:
    digest: str = field(repr=False)  # of the portal's stored application token
    ring: asyncio.Event = field(default_factory=asyncio.Event)
    pulled_at: float = float("-inf")  # loop time of the last pull
    woken: bool = False  # a valid wake came since the last pull


class Wakes:
    def __init__(self, quiet_s: float = QUIET_S) -> None:
        self._quiet_s = quiet_s
        self._portals: dict[str, _Portal] = {}
        self._stopped = False

    def add(self, member_id: str, digest: str) -> None:
        """Start taking wake-ups for this portal (again, with its current token's digest)."""
        known = self._portals.get(member_id)
        if known is None:
            self._portals[member_id] = _Portal(digest)
        else:
            known.digest = digest  # reinstalled meanwhile: the new token's

    def remove(self, member_id: str) -> None:
        self._portals.pop(member_id, None)

    def wake(self, member_id: str | None, digest: str | None) -> bool:
        """A wake-up for `member_id` that came with the token of `digest`: True if it counts."""
        portal = self._portals.get(member_id or "")
        if portal is None or not digest or not hmac.compare_digest(digest, portal.digest):
            return False
        portal.woken = True
        portal.ring.set()
        return True

    def stop(self) -> None:
        """Every wait ends now (and any later one at once)."""
        self._stopped = True
        for portal in self._portals.values():
            portal.ring.set()

    def pulling(self, member_id: str) -> None:
        """A pull of the portal starts: wakes until now are served by it."""
        portal = self._portals[member_id]
        portal.pulled_at = asyncio.get_running_loop().time()
        portal.woken = False

    async def wait(self, member_id: str, delay_s: float, *, backoff: bool) -> None:
        """`delay_s`, or until stopped; a poll wait (not a `backoff`) also ends at a wake-up,
        though not before `quiet_s` after the portal's last pull."""
        portal = self._portals[member_id]
        loop = asyncio.get_running_loop()
        end = loop.time() + delay_s
        while not self._stopped:
            until = end
            if portal.woken and not backoff:
                until = min(end, portal.pulled_at + self._quiet_s)
            left = until - loop.time()
            if left <= 0:
                return
            portal.ring.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(portal.ring.wait(), left)
