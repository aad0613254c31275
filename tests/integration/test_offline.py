"""The offline puller in this process against the fake portal's offline queue and the real
RabbitMQ: records published confirmed and marked, then cleared; the app's own writes and other
sources kept apart; hostile batches bounded; nothing cleared while the broker is away; a batch
left reserved by a crash redone; an ONOFFLINEEVENT through the ingress wakes the puller."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from b24queue.auth.store import open_store
from b24queue.offline import service
from b24queue.offline.process import serve_offline
from b24queue.offline.records import H_OFFLINE, H_OFFLINE_MESSAGE_ID
from b24queue.settings import Settings
from b24queue.telemetry.metrics import OfflineMetrics
from tests.support.fake_offline import FakeOffline
from tests.support.fake_portal import FakePortal, StaticResolver
from tests.support.offline_setup import app_token, bodies, installed, offline_settings, ping_payload
from tests.support.portal_setup import domain_of
from tests.support.proxy import Proxy
from tests.support.rabbitmq import AMQP_URL, Broker, running_ingress
from tests.support.samples import SAMPLE_TOKEN
from tests.support.wait import wait_until

pytestmark = pytest.mark.broker

MEMBER = "m0ff1ine"
HOST = domain_of(MEMBER)


@pytest.fixture
def offline(fake_portal: FakePortal) -> FakeOffline:
    return FakeOffline.attach(fake_portal.rest)


@contextlib.asynccontextmanager
async def puller(settings: Settings) -> AsyncIterator[OfflineMetrics]:
    stop = asyncio.Event()
    metrics = OfflineMetrics()
    task = asyncio.create_task(
        serve_offline(settings, stop, resolver=StaticResolver(), metrics=metrics)
    )
    try:
        yield metrics
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def store_of(tmp_path: Path) -> str:
    return f"sqlite:{tmp_path / 'portals.db'}"


async def test_records_are_published_marked_then_cleared(
    broker: Broker, fake_portal: FakePortal, offline: FakeOffline, portal_certificate: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    await installed(store_of(tmp_path), fake_portal.rest, offline, MEMBER)
    for deal in range(1, 121):
        await offline.change(HOST, "ONCRMDEALUPDATE", deal)
    await offline.change(HOST, "ONCRMDEALUPDATE", 7)  # one record per object: still 120
    seen = await broker.bind_queue("seen", "ONCRMDEALUPDATE")
    settings = offline_settings(broker, store_of(tmp_path), portal_certificate[0])
    async with puller(settings) as metrics:
        await wait_until(lambda: len(offline.cleared) >= 120, 30, "120 records cleared")
        messages = await broker.take(seen, 120)
    assert not offline.waiting(HOST)
    assert sorted(int(o) for _, _, o in offline.cleared) == list(range(1, 121))  # each once
    got = bodies(messages)
    assert sorted(int(b["data"]["FIELDS"]["ID"]) for b in got) == list(range(1, 121))
    first, body = messages[0], got[0]
    assert first.headers[H_OFFLINE] == "1" and first.headers["x-b24-member-id"] == MEMBER
    assert first.headers[H_OFFLINE_MESSAGE_ID] == body["offline"]["message_id"]
    assert first.routing_key == "ONCRMDEALUPDATE" and first.delivery_mode == 2
    assert body["auth"] == {"domain": HOST, "member_id": MEMBER}  # no token, ever
    assert set(body["offline"]) == {"id", "message_id", "process_id", "timestamp", "additional"}
    assert len({m.message_id for m in messages}) == 120
    assert metrics.totals["published"] == 120 and metrics.totals["cleared"] == 120
    shown = metrics.render().decode()
    assert 'b24queue_offline_records_total{outcome="cleared"} 120.0' in shown
    assert "b24queue_offline_portals 1.0" in shown
    gets = [p for _, m, p in offline.calls if m == "event.offline.get"]
    assert all(p["clear"] == 0 and p["auth_connector"] == "b24queue" for p in gets)


async def test_own_writes_and_other_sources_stay_apart(
    broker: Broker, fake_portal: FakePortal, offline: FakeOffline, portal_certificate: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    await installed(store_of(tmp_path), fake_portal.rest, offline, MEMBER)
    offline.queue(HOST).bindings["other-app"] = {"ONCRMDEALUPDATE"}
    await offline.change(HOST, "ONCRMDEALUPDATE", 1, source="b24queue")  # our own write
    await offline.change(HOST, "ONCRMDEALUPDATE", 2)
    seen = await broker.bind_queue("seen", "ONCRMDEALUPDATE")
    settings = offline_settings(broker, store_of(tmp_path), portal_certificate[0])
    async with puller(settings):
        await wait_until(lambda: len(offline.cleared) >= 1, 20, "a record cleared")
        (message,) = await broker.take(seen, 1)
    assert bodies([message])[0]["data"]["FIELDS"]["ID"] == "2"
    # The other source's queue is untouched: both its records wait.
    assert sorted(r.object_id for r in offline.waiting(HOST, "other-app")) == ["1", "2"]
    assert await broker.depth(seen) == 0


async def test_a_hostile_batch_is_bounded_and_its_bad_records_marked(
    broker: Broker, fake_portal: FakePortal, offline: FakeOffline, portal_certificate: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    await installed(store_of(tmp_path), fake_portal.rest, offline, MEMBER)
    for deal in (1, 2, 3, 4):
        await offline.change(HOST, "ONCRMDEALUPDATE", deal)
    bad_name = offline.waiting(HOST)[1].message_id
    too_big = offline.waiting(HOST)[2].message_id

    def tamper(answer: dict[str, Any]) -> dict[str, Any]:
        for row in answer["events"]:
            if row["MESSAGE_ID"] == bad_name:
                row["EVENT_NAME"] = "ON CRM.#"  # no routing key
            if row["MESSAGE_ID"] == too_big:
                row["EVENT_DATA"] = {"x": "y" * 2_000_000}
        # and junk besides: no ID, not a record at all
        answer["events"] += [{"MESSAGE_ID": "\n" * 3}, "junk", None]
        return answer

    offline.tamper = tamper
    seen = await broker.bind_queue("seen", "#")
    settings = offline_settings(broker, store_of(tmp_path), portal_certificate[0])
    async with puller(settings) as metrics:
        await wait_until(lambda: len(offline.cleared) >= 2, 20, "the good records cleared")
        await wait_until(lambda: len(offline.errored) >= 2, 20, "the bad ones marked")
        messages = await broker.take(seen, 2)
    assert sorted(b["data"]["FIELDS"]["ID"] for b in bodies(messages)) == ["1", "4"]
    assert sorted(offline.errored) == sorted([bad_name, too_big])
    assert metrics.totals["errored"] == 2 and metrics.totals["unnamed"] >= 3
    assert await broker.depth(seen) == 0
    # Marked records are read with error=1, not again with the others.
    assert {r.error for r in offline.waiting(HOST)} == {1}


@pytest.mark.long
async def test_nothing_is_cleared_while_the_broker_is_away(
    broker: Broker, fake_portal: FakePortal, offline: FakeOffline, portal_certificate: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    await installed(store_of(tmp_path), fake_portal.rest, offline, MEMBER)
    proxy = Proxy()
    await proxy.start()
    seen = await broker.bind_queue("seen", "ONCRMDEALUPDATE")
    url = AMQP_URL.replace(":5672/", f":{proxy.port}/")
    settings = offline_settings(
        broker, store_of(tmp_path), portal_certificate[0], amqp_url=url, publish_timeout_s=1
    )
    try:
        async with puller(settings) as metrics:
            await offline.change(HOST, "ONCRMDEALUPDATE", 1)
            await wait_until(lambda: len(offline.cleared) == 1, 20, "the first record cleared")
            await proxy.cut()
            for deal in range(2, 31):
                await offline.change(HOST, "ONCRMDEALUPDATE", deal)
            failed = metrics.totals["failed_pulls"]
            await wait_until(
                lambda: metrics.totals["failed_pulls"] >= failed + 3, 30, "pulls failing"
            )
            assert len(offline.cleared) == 1  # reserved, published nowhere, cleared never
            assert all(r.process_id for r in offline.waiting(HOST))
            await proxy.start()
            await wait_until(lambda: len(offline.cleared) == 30, 30, "every record cleared")
        messages = await broker.take(seen, 30)
    finally:
        await proxy.cut()
    assert {b["data"]["FIELDS"]["ID"] for b in bodies(messages)} == {str(i) for i in range(1, 31)}
    assert not offline.waiting(HOST)


async def test_a_batch_left_reserved_by_a_crash_is_redone(
    broker: Broker, fake_portal: FakePortal, offline: FakeOffline, portal_certificate: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    await installed(store_of(tmp_path), fake_portal.rest, offline, MEMBER)
    for deal in range(1, 11):
        await offline.change(HOST, "ONCRMDEALUPDATE", deal)
    # A puller that reserved these and died before it cleared them (nobody knows the id now).
    crashed = await offline.answer(
        HOST, "event.offline.get", {"clear": 0, "limit": 10, "auth_connector": "b24queue"}
    )
    assert crashed is not None
    process_id = crashed[1]["result"]["process_id"]
    assert all(r.process_id == process_id for r in offline.waiting(HOST))
    seen = await broker.bind_queue("seen", "ONCRMDEALUPDATE")
    settings = offline_settings(broker, store_of(tmp_path), portal_certificate[0])
    async with puller(settings) as metrics:
        await wait_until(lambda: len(offline.cleared) == 10, 20, "the reserved batch cleared")
        messages = await broker.take(seen, 10)
    assert metrics.totals["recovered_batches"] == 1
    assert {b["offline"]["process_id"] for b in bodies(messages)} == {process_id}


async def test_onofflineevent_through_the_ingress_wakes_the_puller(
    broker: Broker, fake_portal: FakePortal, offline: FakeOffline, portal_certificate: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    await installed(store_of(tmp_path), fake_portal.rest, offline, MEMBER)
    seen = await broker.bind_queue("seen", "ONCRMDEALUPDATE")
    settings = offline_settings(
        broker, store_of(tmp_path), portal_certificate[0], offline_poll_s=3600,
        app_tokens=f"{SAMPLE_TOKEN},{app_token(MEMBER)}",
    )  # fmt: skip
    async with running_ingress(settings) as (client, _), puller(settings) as metrics:

        async def ping(host: str, handler: str) -> None:
            resp = await client.post("/b24/events", json=ping_payload(MEMBER))
            assert resp.status == 200

        offline.queue(HOST).ping_handler = "https://ingress.example/b24/events"
        offline.ping = ping
        gets = lambda: sum(m == "event.offline.get" for _, m, _ in offline.calls)  # noqa: E731
        await wait_until(lambda: gets() >= 1, 20, "the first pull")
        await wait_until(lambda: metrics.portals._value.get() == 1, 20, "the portal pulled")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await offline.change(HOST, "ONCRMDEALUPDATE", 5)
        (message,) = await broker.take(seen, 1, timeout_s=20)
        waited = loop.time() - started
    assert bodies([message])[0]["data"]["FIELDS"]["ID"] == "5"
    assert offline.pings == 1 and waited < 10  # not the hour of the poll interval


async def test_configured_events_are_bound_at_start(
    broker: Broker, fake_portal: FakePortal, offline: FakeOffline, portal_certificate: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    await installed(store_of(tmp_path), fake_portal.rest, offline, MEMBER)
    offline.queue(HOST).bindings.clear()  # installed, nothing bound yet
    settings = offline_settings(
        broker, store_of(tmp_path), portal_certificate[0],
        offline_events="ONCRMDEALADD,ONCRMDEALUPDATE", offline_ping_url="https://in.example/b24",
    )  # fmt: skip
    seen = await broker.bind_queue("seen", "ONCRMDEALADD")
    async with puller(settings):
        await wait_until(lambda: bool(offline.queue(HOST).bindings), 20, "the events bound")
        await offline.change(HOST, "ONCRMDEALADD", 3)
        (message,) = await broker.take(seen, 1)
    assert offline.queue(HOST).bindings == {"b24queue": {"ONCRMDEALADD", "ONCRMDEALUPDATE"}}
    assert offline.queue(HOST).ping_handler == "https://in.example/b24"
    assert bodies([message])[0]["data"]["FIELDS"]["ID"] == "3"


async def test_a_failed_binding_is_tried_again_and_dropped_ones_are_bound_again(
    broker: Broker, fake_portal: FakePortal, offline: FakeOffline, portal_certificate: Any,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A binding that failed at start (the portal answered 500) must not leave the portal
    unbound until the puller restarts; nor must an app update, which drops every binding."""
    monkeypatch.setattr(service, "BIND_RETRY_S", 0.3)
    monkeypatch.setattr(service, "REBIND_S", 1.5)
    await installed(store_of(tmp_path), fake_portal.rest, offline, MEMBER)
    offline.queue(HOST).bindings.clear()
    offline.failing["event.bind"] = 3  # three attempts fail (one call each), the fourth binds
    settings = offline_settings(
        broker, store_of(tmp_path), portal_certificate[0], offline_events="ONCRMDEALADD"
    )
    seen = await broker.bind_queue("seen", "ONCRMDEALADD")
    expected = {"b24queue": {"ONCRMDEALADD"}}
    async with puller(settings):
        await wait_until(lambda: offline.queue(HOST).bindings == expected, 20, "bound at last")
        assert offline.failing["event.bind"] == 0
        binds = sum(m == "event.bind" for _, m, _ in offline.calls)
        assert binds >= 4  # three refused, then bound
        offline.queue(HOST).bindings.clear()  # the app updated: the portal dropped them
        await wait_until(lambda: offline.queue(HOST).bindings == expected, 20, "bound again")
        await offline.change(HOST, "ONCRMDEALADD", 4)
        (message,) = await broker.take(seen, 1)
    assert bodies([message])[0]["data"]["FIELDS"]["ID"] == "4"


async def test_tenants_never_mix_and_an_uninstalled_portal_is_left(
    broker: Broker, fake_portal: FakePortal, offline: FakeOffline, portal_certificate: Any,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(service, "REFRESH_S", 0.2)  # the store re-read often
    other = "m0ther0ff"
    await installed(store_of(tmp_path), fake_portal.rest, offline, MEMBER)
    await installed(store_of(tmp_path), fake_portal.rest, offline, other)
    for deal in range(1, 11):
        await offline.change(HOST, "ONCRMDEALUPDATE", deal)
        await offline.change(domain_of(other), "ONCRMDEALUPDATE", 100 + deal)
    seen = await broker.bind_queue("seen", "ONCRMDEALUPDATE")
    settings = offline_settings(broker, store_of(tmp_path), portal_certificate[0])
    async with puller(settings) as metrics:
        messages = await broker.take(seen, 20)
        for message, body in zip(messages, bodies(messages), strict=True):
            member = message.headers["x-b24-member-id"]
            assert body["auth"]["member_id"] == member
            assert (int(body["data"]["FIELDS"]["ID"]) > 100) == (member == other)
            assert body["auth"]["domain"] == domain_of(member)
        store = open_store(store_of(tmp_path))
        await store.forget(other)
        await store.close()
        await wait_until(lambda: metrics.portals._value.get() == 1, 20, "the portal left")
        await offline.change(domain_of(other), "ONCRMDEALUPDATE", 150)
        await offline.change(HOST, "ONCRMDEALUPDATE", 50)
        (last,) = await broker.take(seen, 1)
    assert bodies([last])[0]["auth"]["member_id"] == MEMBER
    assert [r.object_id for r in offline.waiting(domain_of(other))] == ["150"]
