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

from b24queue.auth.record import PortalRecord, TokenStore
from b24queue.auth.redis_store import RedisTokenStore
from b24queue.auth.sqlite_store import SqliteTokenStore
from b24queue.errors import ConfigError

__all__ = ["PortalRecord", "RedisTokenStore", "SqliteTokenStore", "TokenStore", "open_store"]


def open_store(spec: str) -> TokenStore:
    """`sqlite:PATH` or `redis://…` (from B24QUEUE_PORTAL_STORE)."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisTokenStore(spec)
    if spec.startswith("sqlite:"):
        return SqliteTokenStore(Path(spec.removeprefix("sqlite:")))
    raise ConfigError(
        f"B24QUEUE_PORTAL_STORE: {spec!r} is neither sqlite:PATH nor redis://HOST:PORT/DB"
    )
