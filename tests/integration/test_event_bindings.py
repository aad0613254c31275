"""`b24queue offline` keeps the app's online bindings (b24queue.offline.bindings) against the fake
portal and the real RabbitMQ: bound when the process finds the portal, and bound again at once
when the portal's ONAPPUPDATE comes through the ingress (Bitrix24 drops an app's bindings when
it is updated), not an hour later."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from b24queue.offline.process import serve_offline
from b24queue.telemetry.metrics import OfflineMetrics
from tests.support.fake_events import Bound, FakeEvents
from tests.support.fake_offline import FakeOffline
from tests.support.fake_portal import FakePortal, StaticResolver
from tests.support.offline_setup import app_token, installed, offline_settings
from tests.support.portal_setup import domain_of
from tests.support.rabbitmq import Broker, running_ingress
from tests.support.samples import SAMPLE_TOKEN
from tests.support.wait import wait_until

pytestmark = pytest.mark.broker

MEMBER = "mb1nd"
HOST = domain_of(MEMBER)
OURS = "https://app.example.com/b24/events"
WANTED = ("ONCRMDEALADD", "ONCRMDEALUPDATE")


async def test_bound_at_start_and_again_at_onappupdate(
    broker: Broker, fake_portal: FakePortal, portal_certificate: Any, tmp_path: Path
) -> None:
    events = FakeEvents.attach(fake_portal.rest)
    offline = FakeOffline.attach(fake_portal.rest)
    store = f"sqlite:{tmp_path / 'portals.db'}"
    await installed(store, fake_portal.rest, offline, MEMBER)
    events.bindings[HOST] = [Bound("ONCRMLEADADD", "https://other.example/hook")]
    settings = offline_settings(
        broker, store, portal_certificate[0],
        app_tokens=f"{SAMPLE_TOKEN},{app_token(MEMBER)}",
        events_handler_url=OURS, events_bindings_queue=broker.name("bindings"),
    )  # fmt: skip
    ours = lambda: {b.event for b in events.of(HOST) if b.handler == OURS}  # noqa: E731
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve_offline(
            settings, stop, resolver=StaticResolver(), metrics=OfflineMetrics(), wanted=WANTED
        )
    )
    try:
        async with running_ingress(settings) as (client, _):
            await wait_until(lambda: ours() == set(WANTED), 20, "bound at start")
            events.bindings[HOST] = [b for b in events.of(HOST) if b.handler != OURS]
            loop = asyncio.get_running_loop()
            started = loop.time()
            update = {
                "event": "ONAPPUPDATE",
                "data": {"VERSION": "2", "LANGUAGE_ID": "en"},
                "ts": "1722000000",
                "auth": {
                    "domain": HOST,
                    "member_id": MEMBER,
                    "application_token": app_token(MEMBER),
                },
            }
            resp = await client.post("/b24/events", json=update)
            assert resp.status == 200
            await wait_until(lambda: ours() == set(WANTED), 20, "bound again")
            waited = loop.time() - started
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert waited < 10  # at the update, not at the hourly round
    assert Bound("ONCRMLEADADD", "https://other.example/hook") in events.of(HOST)
