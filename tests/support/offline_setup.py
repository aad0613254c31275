"""Shared by the offline events' tests: settings for a puller on a test's slice of the broker
and the fake portal, a portal installed with offline events bound, and ONOFFLINEEVENT pings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from b24queue.auth.record import PortalRecord
from b24queue.auth.store import open_store
from b24queue.settings import Settings
from tests.support.fake_offline import FakeOffline
from tests.support.fake_portal import CLIENT_ID
from tests.support.fake_rest import CLIENT_SECRET, FakeRest
from tests.support.portal_setup import OAUTH_URL, domain_of, install
from tests.support.rabbitmq import AMQP_URL, Broker
from tests.support.samples import SAMPLE_TOKEN

EVENTS = ("ONCRMDEALUPDATE", "ONCRMDEALADD")


def offline_values(broker: Broker, store: str, cert: Path, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "portal_store": store,
        "app_client_id": CLIENT_ID,
        "app_client_secret": CLIENT_SECRET,
        "oauth_url": OAUTH_URL,
        "portal_allow_private": True,
        "portal_ca_file": str(cert),
        "portal_call_timeout_s": 10,
        # Bitrix24's bucket shape, time scaled down (the fake's is set to match).
        "portal_burst": 50,
        "portal_drain_per_s": 100,
        "offline_poll_s": 0.2,
        "offline_wake_queue": broker.name("offline-wake"),
    }
    values.update(extra)
    return values


def offline_settings(broker: Broker, store: str, cert: Path, **extra: Any) -> Settings:
    return broker.make_settings(**offline_values(broker, store, cert, **extra))


def offline_env(
    broker: Broker, store: str, cert: Path, portal_port: int, **extra: Any
) -> dict[str, str]:
    """The environment of a puller process (tests/support/offline_puller.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24QUEUE_", "B24QT_"))}
    values = {
        "amqp_url": AMQP_URL,
        "exchange": broker.settings.exchange,
        "unrouted": broker.settings.unrouted,
        "app_tokens": SAMPLE_TOKEN,
        "publish_timeout_s": 3,
        "reconnect_interval_s": 0.2,
        "shutdown_timeout_s": 10,
        **offline_values(broker, store, cert),
        **extra,
    }
    env.update({f"B24QUEUE_{k.upper()}": str(v) for k, v in values.items()})
    env["B24QT_PORTAL_PORT"] = str(portal_port)
    return env


async def installed(
    store_spec: str, rest: FakeRest, offline: FakeOffline, member: str, connector: str = "b24queue"
) -> PortalRecord:
    """A portal installed (tokens in the store), its offline events bound for `connector`."""
    rest.drain_per_s = 100.0
    store = open_store(store_spec)
    try:
        record = await install(store, rest, member)
    finally:
        await store.close()
    offline.queue(domain_of(member)).bindings[connector] = set(EVENTS)
    return record


def app_token(member: str) -> str:
    """The portal's own application token, as tests.support.portal_setup.install stores it."""
    return f"app-token-{member}"


def ping_payload(member: str, token: str | None = None) -> dict[str, Any]:
    """ONOFFLINEEVENT as Bitrix24 sends it: empty data, the portal's own application token (a
    wake-up counts only with it; the ingress must accept it too: `app_tokens`)."""
    return {
        "event": "ONOFFLINEEVENT",
        "data": [],
        "ts": "1466439714",
        "auth": {
            "domain": domain_of(member),
            "member_id": member,
            "application_token": token or app_token(member),
        },
    }


def bodies(messages: list[AbstractIncomingMessage]) -> list[dict[str, Any]]:
    return [json.loads(m.body) for m in messages]
