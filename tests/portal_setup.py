"""Shared by the portal client's tests: settings pointing at the fake portal, a portal installed
in a store with tokens the fake issued, and events naming a deal."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from b24queue.auth.record import PortalRecord
from b24queue.auth.store import TokenStore
from b24queue.events import Event
from b24queue.settings import Settings, load_settings
from tests.fake_portal import CLIENT_ID
from tests.fake_rest import CLIENT_SECRET, FakeRest

OAUTH_URL = "https://oauth.portal.test/oauth/token/"


def portal_settings(cert: Path, store: str, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "app_client_id": CLIENT_ID,
        "app_client_secret": CLIENT_SECRET,
        "oauth_url": OAUTH_URL,
        "portal_store": store,
        "portal_allow_private": True,  # the fake portal is on loopback
        "portal_ca_file": str(cert),
        "portal_call_timeout_s": 10,
    }
    values.update(extra)
    return load_settings(**values)


def domain_of(member: str) -> str:
    return f"{member}.portal.test"


async def install(
    store: TokenStore, rest: FakeRest, member: str, lifetime_s: float | None = None
) -> PortalRecord:
    """The portal as an accepted ONAPPINSTALL leaves it in the store."""
    access, refresh, expires = rest.issue(member, lifetime_s)
    domain = domain_of(member)
    record = PortalRecord(
        member_id=member,
        domain=domain,
        token=f"app-token-{member}",
        access_token=access,
        access_expires=expires,
        refresh_token=refresh,
        client_endpoint=f"https://{domain}/rest/",
    )
    assert await store.remember(record)
    return record


def deal_event(
    member: str, deal_id: int, *, access: str = "", expires: int | None = None, domain: str = ""
) -> Event:
    auth: dict[str, Any] = {
        "domain": domain or domain_of(member),
        "member_id": member,
        "application_token": f"app-token-{member}",
        "client_endpoint": f"https://{domain or domain_of(member)}/rest/",
    }
    if access:
        auth["access_token"] = access
        auth["expires"] = str(expires if expires is not None else int(time.time()) + 3600)
    return Event.from_payload(
        {"event": "ONCRMDEALUPDATE", "data": {"FIELDS": {"ID": str(deal_id)}}, "auth": auth}
    )
