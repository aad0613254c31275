"""Shared by the portal tests: settings pointing at the fake portal (a portal client's, an ingress
verifying portals, a worker process's environment), a portal installed in a store with tokens the
fake issued, and events naming a deal or a portal."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from b24queue.auth.record import PortalRecord
from b24queue.auth.store import TokenStore
from b24queue.events import Event
from b24queue.settings import Settings, load_settings
from tests.support.fake_portal import CLIENT_ID
from tests.support.fake_rest import CLIENT_SECRET, FakeRest
from tests.support.rabbitmq import AMQP_URL, Broker

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


def portal_event(
    name: str,
    *,
    member: str = "m1",
    token: str = "tok-1",
    domain: str = "acme.portal.test",
    endpoint: str | None = None,
    access: str = "good-1",
) -> Event:
    return Event.from_payload(
        {
            "event": name,
            "auth": {
                "domain": domain,
                "member_id": member,
                "application_token": token,
                "access_token": access,
                "client_endpoint": endpoint if endpoint is not None else f"https://{domain}/rest/",
            },
        }
    )


def verifier_settings(cert: Path, **extra: Any) -> Settings:
    """Settings of an ingress that verifies portals (`*.portal.test`) against the fake."""
    values: dict[str, Any] = {
        "portal_verification": True,
        "app_client_id": CLIENT_ID,
        "portal_domains": "*.portal.test",
        "portal_allow_private": True,
        "portal_ca_file": str(cert),
        "portal_check_timeout_s": 1.0,
    }
    values.update(extra)
    return load_settings(**values)


def portal_env(broker: Broker, store: str, cert: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a worker process that calls the fake portal (portal_worker.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24QUEUE_", "B24QT_"))}
    env.update(
        {
            "B24QUEUE_AMQP_URL": AMQP_URL,
            "B24QUEUE_EXCHANGE": broker.settings.exchange,
            "B24QUEUE_UNROUTED": broker.settings.unrouted,
            "B24QUEUE_APP_TOKENS": "unused",
            "B24QUEUE_SHUTDOWN_TIMEOUT_S": "10",
            "B24QUEUE_PORTAL_STORE": store,
            "B24QUEUE_APP_CLIENT_ID": CLIENT_ID,
            "B24QUEUE_APP_CLIENT_SECRET": CLIENT_SECRET,
            "B24QUEUE_OAUTH_URL": OAUTH_URL,
            "B24QUEUE_PORTAL_ALLOW_PRIVATE": "true",
            "B24QUEUE_PORTAL_CA_FILE": str(cert),
            "B24QT_PORTAL_PORT": str(port),
            **extra,
        }
    )
    return env
