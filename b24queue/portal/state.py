"""The state every worker and offline process on one portal store shares: each portal's bucket
(b24queue.portal.limits), the methods its run-time limit holds, and its refresh lease, one token
refresh per portal at a time across processes (a refresh token is single-use; two concurrent
refreshes would lose the portal). Kept beside the store: `sqlite_state` or `redis_state`.
"""

from __future__ import annotations

from typing import Protocol

from b24queue.portal.limits import Limit
from b24queue.secrets.stores import store_at


class SharedState(Protocol):
    """Buckets and leases of every portal, shared by the processes using one portal store."""

    async def reserve(self, key: str, limit: Limit) -> float | None:
        """Seconds to wait before sending one request to portal `key`, or None: over the wait."""

    async def hold(self, key: str, method: str, for_s: float) -> None:
        """Nobody calls `method` on portal `key` for `for_s` seconds from now (a longer hold
        already there stays). At most `limits.MAX_HELD_METHODS` per portal: the soonest free
        goes."""

    async def held(self, key: str, method: str) -> float:
        """Seconds until `method` may be called on portal `key` again (0.0: now)."""

    async def lease(self, key: str, owner: str, ttl_s: float) -> bool:
        """Take portal `key`'s refresh lease for `ttl_s` if nobody holds it (or theirs ran out)."""

    async def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        """Hold the lease `ttl_s` more from now, if `owner` still holds it (True then)."""

    async def release(self, key: str, owner: str) -> None:
        """Give the lease back, if `owner` still holds it."""

    async def close(self) -> None: ...


def open_state(spec: str) -> SharedState:
    """Beside the portal store (B24QUEUE_PORTAL_STORE): `sqlite:PATH` or `redis://…`."""
    where = store_at(spec)
    if isinstance(where, str):
        from b24queue.portal.redis_state import RedisState

        return RedisState(where)
    from b24queue.portal.sqlite_state import SqliteState

    return SqliteState(where)
