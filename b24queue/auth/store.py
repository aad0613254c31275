"""Per-portal application tokens and OAuth credentials, learned from ONAPPINSTALL and kept per
member_id.

A Bitrix24 app installed on many portals gets a different `application_token` from each, first
in its ONAPPINSTALL event. The store remembers it (durably, before the ingress answers) so every
later event of that portal can be compared with it, and beside it the portal's REST endpoint and
OAuth tokens, for calling the portal back (b24queue.portal). Tokens are never logged; `all`
returns them only for the verifier, and `PortalRecord.__repr__` hides them. Two kinds: one SQLite
file (b24queue.auth.sqlite_store, 0600) and Redis (b24queue.auth.redis_store).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from b24queue.auth.record import Grant, PortalRecord
from b24queue.auth.redis_store import RedisTokenStore
from b24queue.auth.sqlite_store import SqliteTokenStore
from b24queue.secrets.stores import store_at

__all__ = [
    "Grant",
    "PortalRecord",
    "RedisTokenStore",
    "SqliteTokenStore",
    "TokenStore",
    "open_store",
]


class TokenStore(Protocol):
    """Writes are compare-and-set, so two ingress processes (or nodes) handling installs of one
    portal at once cannot overwrite each other's decision."""

    async def get(self, member_id: str) -> PortalRecord | None: ...

    async def remember(self, record: PortalRecord, replacing: str | None = None) -> bool:
        """Store `record` if the portal is unknown (`replacing` None), or if its stored token is
        still `replacing`. True when stored; durable before it returns."""

    async def forget(self, member_id: str, token: str | None = None) -> bool:
        """Forget the portal and all its credentials (only while its token is `token`)."""

    async def refresh_access(self, member_id: str, token: str, grant: Grant) -> bool:
        """Keep a fresher access token (and the refresh token that came with it, if any), while
        the portal's token is still `token` and the stored access token expires sooner."""

    async def refreshed(self, member_id: str, old_refresh: str, grant: Grant) -> bool:
        """Keep the pair an OAuth refresh returned (its refresh token, '' included), only while
        the stored refresh token is still `old_refresh` (the one spent): a compare-and-set, so a
        refresh that lost a race (or a portal uninstalled meanwhile) writes nothing."""

    async def all(self) -> list[PortalRecord]: ...

    async def close(self) -> None: ...


def open_store(spec: str) -> TokenStore:
    """`sqlite:PATH` or `redis://…` (from B24QUEUE_PORTAL_STORE)."""
    where = store_at(spec)
    return SqliteTokenStore(where) if isinstance(where, Path) else RedisTokenStore(where)
