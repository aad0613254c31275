"""Several broker addresses (the nodes of one cluster), tried in turn: here two TCP proxies in
front of the one local RabbitMQ stand for two nodes, so a "node" can go away while the broker
stays. The cluster itself is tested by `make faults-cluster`."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from b24queue import Event, EventConsumer
from b24queue.transports.amqp.management import ManagementClient
from b24queue.worker import Worker
from tests.support.proxy import Proxy, free_port
from tests.support.rabbitmq import AMQP_URL, MGMT_URL, Broker, running_ingress
from tests.support.samples import sample_form
from tests.support.wait import wait_until

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def node(port: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:{port}/"


async def post(client: Any, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        resp = await client.post("/b24/events", data=sample_form("crm-deal-add"), headers=FORM)
        assert resp.status == 200, await resp.text()
        ids.append((await resp.json())["message_id"])
    return ids


async def test_the_first_node_that_answers_is_used(broker: Broker) -> None:
    settings = broker.make_settings(amqp_url=f"{node(free_port())},{AMQP_URL}")
    queue = await broker.bind_queue("all", "#")
    async with running_ingress(settings) as (client, _):
        await post(client, 2)
    assert await broker.depth(queue) == 2


async def test_a_lost_node_is_left_for_the_next_with_consumers_restored(broker: Broker) -> None:
    a, b = Proxy(), Proxy()
    await a.start()
    await b.start()
    settings = broker.make_settings(
        amqp_url=f"{node(a.port)},{node(b.port)}",
        management_url=f"http://127.0.0.1:{free_port()},{MGMT_URL}",
    )
    seen: list[str] = []

    async def handle(self: EventConsumer, event: Event) -> None:
        seen.append(event.message_id or "")

    queue = broker.name(f"fo{uuid.uuid4().hex[:6]}")
    cls = type("C", (EventConsumer,), {"queue": queue, "events": ("#",), "handle": handle})
    try:
        async with Worker(settings, [cls]), running_ingress(settings) as (client, publisher):
            first = await post(client, 3)
            await wait_until(lambda: set(first) <= set(seen), 15, "handled through node A")
            await a.cut()  # node A is gone, for every connection through it
            await wait_until(publisher.is_ready, 20, "the publisher on node B")
            second = await post(client, 3)
            await wait_until(lambda: set(second) <= set(seen), 30, "handled through node B")

            # The worker's connection came back under its name (the management API answered
            # from the second address: the first has nothing listening).
            def named() -> bool:
                names = {
                    c.get("client_properties", {}).get("connection_name", "")
                    for c in ManagementClient(settings).connections()
                }
                return any(n.startswith(f"b24queue worker {queue} ") for n in names)

            await wait_until(named, 20, "the worker's connection listed under its name")
    finally:
        await a.cut()
        await b.cut()


class BlackHole:
    """A "node" that accepts connections and never answers (a host gone without a word)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", self.port)

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)

    async def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_after_losing_its_node_a_connection_tries_the_next_node_first(
    broker: Broker,
) -> None:
    """Node A is lost and its address then swallows connections without answering: the
    reconnection starts with node B (a lost node is tried last), so it never waits on A."""
    a, b = Proxy(), Proxy()
    await a.start()
    await b.start()
    settings = broker.make_settings(amqp_url=f"{node(a.port)},{node(b.port)}")
    queue = await broker.bind_queue("all", "#")
    hole = BlackHole(a.port)
    try:
        async with running_ingress(settings) as (client, publisher):
            await post(client, 1)
            await a.cut()
            await hole.start()  # before the reconnection (B24QUEUE_RECONNECT_INTERVAL_S later)
            await wait_until(lambda: not publisher.is_ready(), 10, "the loss noticed")
            await wait_until(publisher.is_ready, 20, "the publisher on node B")
            await post(client, 1)
            assert hole.accepted == 0, "the lost node was tried before the next one"
    finally:
        await hole.close()
        await b.cut()
    assert await broker.depth(queue) == 2


async def test_a_nack_moves_publishing_to_a_new_channel(broker: Broker) -> None:
    """A queue that refuses (reject-publish at its length limit) nacks; the publisher then opens
    a new channel (a stale one can nack for ever after a quorum leader change), and publishes go
    on once the queue takes messages again."""
    from b24queue.transports.amqp.topology import declare_exchanges

    settings = broker.make_settings()
    full = broker.name("full")
    async with broker.connection.channel() as channel:
        exchange = await declare_exchanges(channel, settings)
        queue = await channel.declare_queue(
            full, durable=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        await queue.bind(exchange, routing_key="#")
    async with running_ingress(settings) as (client, publisher):
        first = publisher._channel
        resp = await client.post("/b24/events", data=sample_form("crm-deal-add"), headers=FORM)
        assert resp.status == 503  # nacked (no spool in this app): refused, not accepted
        await wait_until(lambda: publisher._channel is not first, 10, "a new publishing channel")
        async with broker.connection.channel() as channel:
            await channel.queue_delete(full)
        await wait_until(publisher.is_ready, 10, "ready on the new channel")
        await post(client, 1)
