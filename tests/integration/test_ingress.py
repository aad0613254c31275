"""The ingress against the real RabbitMQ: what a 200 means, and what never gets published."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest

from b24queue.errors import TopologyMismatchError
from b24queue.transports.amqp.publisher import AmqpPublisher
from tests.support.proxy import Proxy, channel_open
from tests.support.rabbitmq import Broker, running_ingress
from tests.support.samples import SAMPLE_NAMES, SAMPLE_TOKEN, sample_form, sample_published
from tests.support.wait import wait_until

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
pytestmark = pytest.mark.broker


async def test_every_sample_arrives_as_a_durable_message_with_its_properties(
    broker: Broker,
) -> None:
    queue = await broker.bind_queue("all", "#")
    answered: dict[str, str] = {}
    async with running_ingress(broker.settings) as (client, _):
        for name in SAMPLE_NAMES:
            resp = await client.post("/b24/events", data=sample_form(name), headers=FORM)
            assert resp.status == 200, await resp.text()
            answered[(await resp.json())["message_id"]] = name
    messages = await broker.take(queue, len(SAMPLE_NAMES))
    assert {m.message_id for m in messages} == set(answered)
    for m in messages:
        assert m.message_id is not None
        expected = sample_published(answered[m.message_id])
        assert json.loads(m.body) == expected
        assert m.routing_key == expected["event"]
        assert m.type == expected["event"]
        assert m.delivery_mode == 2
        assert m.content_type == "application/json"
        assert m.app_id == "b24queue"
        assert m.timestamp is not None and abs(m.timestamp.timestamp() - time.time()) < 120
        assert m.headers["x-b24-domain"] == "acme.bitrix24.com"
        assert m.headers["x-b24-member-id"] == "5f2a9c3e1b7d4a6f8e0c2b4d6f8a0c1e"
    assert await broker.depth(queue) == 0


async def test_an_event_nobody_is_bound_to_lands_in_unrouted(broker: Broker) -> None:
    deals = await broker.bind_queue("deals", "ONCRMDEALADD")
    async with running_ingress(broker.settings) as (client, _):
        resp = await client.post("/b24/events", data=sample_form("task-add"), headers=FORM)
        assert resp.status == 200
        message_id = (await resp.json())["message_id"]
    [message] = await broker.take(broker.settings.unrouted, 1)
    assert message.message_id == message_id
    assert message.routing_key == "ONTASKADD"
    assert await broker.depth(deals) == 0


async def test_refused_requests_publish_nothing(broker: Broker) -> None:
    everything = await broker.bind_queue("all", "#")
    wrong_token = sample_form("crm-deal-add").replace(SAMPLE_TOKEN.encode(), b"0" * 32)
    cases = [
        (400, b"a=1&a[b]=2&event=ONX", FORM),
        (400, b"event=ONX&x[y=1", FORM),
        (400, b"event=ONX&x" + b"[y]" * 40 + b"=1", FORM),
        (400, b"data[ID]=1", FORM),
        (400, b"{bad json", {"Content-Type": "application/json"}),
        (401, wrong_token, FORM),
        (413, b"event=ONX&x=" + b"a" * (2 * 1024 * 1024), FORM),
        (415, sample_form("crm-deal-add"), {"Content-Type": "text/plain"}),
    ]
    async with running_ingress(broker.settings) as (client, _):
        for status, body, headers in cases:
            data = io.BytesIO(body) if len(body) > 1024 * 1024 else body
            resp = await client.post("/b24/events", data=data, headers=headers)
            assert resp.status == status, (status, await resp.text())
            assert "error" in await resp.json()
        assert (await client.get("/b24/events")).status == 405
        # The same connection still publishes: the refusals did not break anything.
        ok = await client.post("/b24/events", data=sample_form("crm-deal-add"), headers=FORM)
        assert ok.status == 200
    assert await broker.depth(everything) == 1
    assert await broker.depth(broker.settings.unrouted) == 0


async def test_broker_unreachable_then_back_without_restart(broker: Broker) -> None:
    proxy = Proxy()
    settings = broker.make_settings(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", publish_timeout_s=0.75
    )
    queue = await broker.bind_queue("all", "#")
    body = sample_form("crm-deal-add")
    async with running_ingress(settings, wait_connected=False) as (client, publisher):
        # Nothing listens yet: refuse quickly and say so.
        started = time.monotonic()
        resp = await client.post("/b24/events", data=body, headers=FORM)
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        assert time.monotonic() - started < 1.0
        assert (await client.get("/readyz")).status == 503
        assert (await client.get("/healthz")).status == 200

        await proxy.start()
        await wait_until(publisher.connected.is_set, what="first connection")
        assert (await client.get("/readyz")).status == 200
        assert (await client.post("/b24/events", data=body, headers=FORM)).status == 200

        # The connection dies under the ingress: 503 within the publish deadline, readyz 503.
        await proxy.cut()
        await wait_until(lambda: not publisher.is_ready(), what="not ready after cut")
        assert (await client.get("/readyz")).status == 503
        started = time.monotonic()
        resp = await client.post("/b24/events", data=body, headers=FORM)
        assert resp.status == 503
        assert time.monotonic() - started < 1.5

        # And it comes back by itself.
        await proxy.start()
        await wait_until(publisher.is_ready, what="ready after the broker is back")
        assert (await client.get("/readyz")).status == 200
        assert (await client.post("/b24/events", data=body, headers=FORM)).status == 200
        await proxy.cut()
    assert await broker.depth(queue) == 2


async def test_broker_lost_while_the_first_channel_opens_then_back(broker: Broker) -> None:
    # The connection is up, the broker goes away as the publishing channel opens and stays away
    # past a reconnect attempt: the ingress keeps trying (it must not exit) and is ready after.
    proxy = Proxy(cut_on=channel_open)
    await proxy.start()
    settings = broker.make_settings(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", reconnect_interval_s=0.2
    )
    queue = await broker.bind_queue("all", "#")
    async with running_ingress(settings, wait_connected=False) as (client, publisher):
        await asyncio.wait_for(proxy.tripped.wait(), timeout=10)
        await asyncio.sleep(1.0)  # several reconnect intervals with nothing listening
        assert (await client.get("/readyz")).status == 503
        await proxy.start()
        await wait_until(publisher.is_ready, what="ready once the broker is back")
        body = sample_form("crm-deal-add")
        assert (await client.post("/b24/events", data=body, headers=FORM)).status == 200
        await proxy.cut()
    assert await broker.depth(queue) == 1


async def test_connection_closed_by_the_broker_is_survived(broker: Broker) -> None:
    queue = await broker.bind_queue("all", "#")
    body = sample_form("crm-deal-add")
    async with running_ingress(broker.settings, name="ingress-forced") as (client, publisher):
        assert (await client.post("/b24/events", data=body, headers=FORM)).status == 200
        await wait_until(
            lambda: broker.mgmt.connections_named(f"ingress-forced {broker.settings.exchange}"),
            what="connection visible in the management API",
        )
        closed = await broker.mgmt.close_connections(f"ingress-forced {broker.settings.exchange}")
        assert closed == 1
        # Published across the reconnect (bounded retry within the deadline), or refused:
        # never a 200 without a confirm. Afterwards it must work again.
        statuses = []
        for _ in range(5):
            resp = await client.post("/b24/events", data=body, headers=FORM)
            statuses.append(resp.status)
        assert set(statuses) <= {200, 503}
        await wait_until(publisher.is_ready, what="ready again")
        assert (await client.post("/b24/events", data=body, headers=FORM)).status == 200
    accepted = 2 + statuses.count(200)
    assert await broker.depth(queue) >= accepted


async def test_the_connection_is_named_in_the_management_ui(broker: Broker) -> None:
    async with running_ingress(broker.settings, name="ingress-named"):
        await wait_until(
            lambda: broker.mgmt.connections_named("b24queue ingress-named"), what="named connection"
        )


async def test_mismatching_existing_queue_is_a_clear_error(broker: Broker) -> None:
    # The unrouted queue exists as a classic queue; we declare quorum: refuse, name both.
    async with broker.connection.channel() as channel:
        await channel.declare_queue(broker.settings.unrouted, durable=True)
    async with AmqpPublisher(broker.settings, "mismatch") as publisher:
        error = await publisher.failed()
    assert isinstance(error, TopologyMismatchError)
    text = str(error)
    assert f"queue '{broker.settings.unrouted}'" in text
    assert "x-queue-type" in text
