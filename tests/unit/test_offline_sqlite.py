"""The puller on the embedded SQLite queue (no RabbitMQ): records reach a consumer through the
same confirmed path, and an ONOFFLINEEVENT posted to the ingress wakes the puller through its
wake-up queue on that transport."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from b24queue import Event, EventConsumer
from b24queue.auth.tokens import StaticTokens
from b24queue.ingress.app import create_app
from b24queue.offline.process import serve_offline
from b24queue.settings import load_settings
from b24queue.transports import transport_for
from b24queue.worker import Worker
from tests.support.fake_offline import FakeOffline
from tests.support.fake_portal import FakePortal, StaticResolver
from tests.support.fake_rest import CLIENT_SECRET
from tests.support.offline_setup import app_token, installed, ping_payload
from tests.support.portal_setup import CLIENT_ID, OAUTH_URL, domain_of
from tests.support.samples import SAMPLE_TOKEN
from tests.support.wait import wait_until

MEMBER = "msqlite0ff"
HOST = domain_of(MEMBER)


async def test_offline_records_through_the_sqlite_queue_and_a_ping_wakes_it(
    fake_portal: FakePortal, portal_certificate: Any, tmp_path: Path
) -> None:
    offline = FakeOffline.attach(fake_portal.rest)
    store = f"sqlite:{tmp_path / 'portals.db'}"
    await installed(store, fake_portal.rest, offline, MEMBER)
    settings = load_settings(
        broker_url=f"sqlite:{tmp_path / 'queue.db'}",
        app_tokens=f"{SAMPLE_TOKEN},{app_token(MEMBER)}",
        portal_store=store,
        app_client_id=CLIENT_ID,
        app_client_secret=CLIENT_SECRET,
        oauth_url=OAUTH_URL,
        portal_allow_private=True,
        portal_ca_file=str(portal_certificate[0]),
        portal_drain_per_s=100,
        offline_poll_s=3600,  # only its start and the ping make it pull
        shutdown_timeout_s=5,
    )
    got: list[Event] = []

    async def handle(self: EventConsumer, event: Event) -> None:
        got.append(event)

    seen = type(
        "Seen",
        (EventConsumer,),
        {"queue": "seen", "events": ("ONCRMDEALUPDATE",), "handle": handle},
    )
    for deal in range(1, 31):
        await offline.change(HOST, "ONCRMDEALUPDATE", deal)
    stop = asyncio.Event()
    tokens = StaticTokens(settings.app_tokens)
    async with (
        Worker(settings, [seen]),
        transport_for(settings).publisher("ingress") as sink,
        TestClient(TestServer(create_app(settings, sink, tokens))) as ingress,
    ):
        pulling = asyncio.create_task(serve_offline(settings, stop, resolver=StaticResolver()))
        await wait_until(lambda: len(got) == 30, 20, "the queued records")
        assert all(e.offline is not None for e in got) and not offline.waiting(HOST)

        async def ping(host: str, handler: str) -> None:
            resp = await ingress.post("/b24/events", json=ping_payload(MEMBER))
            assert resp.status == 200

        offline.ping = ping
        offline.queue(HOST).ping_handler = "https://ingress.example/b24/events"
        await offline.change(HOST, "ONCRMDEALUPDATE", 99)
        await wait_until(lambda: len(got) == 31, 20, "the record the ping announced")
        stop.set()
        await asyncio.wait_for(pulling, 20)
    assert got[-1].data == {"FIELDS": {"ID": "99"}} and got[-1].offline is not None
