"""The worker's direct delivery path (`fast_consume`) on the real broker: after a channel's first
delivery its deliveries skip aio-pika's wrapper and are acked by frames of our own, again after
a reconnect; and where the direct path cannot be used, aio-pika's path does all of it."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import aio_pika
import aiormq
import pytest

from b24queue import Event, EventConsumer
from b24queue.runtime import Worker
from b24queue.transports.amqp import fast_consume
from b24queue.transports.amqp.worker import ConsumerRunner
from tests.integration.conftest import Broker, wait_until

pytestmark = pytest.mark.broker


class Paths:
    """Counts deliveries by the way they came, and acks by the way they went."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.came: Counter[str] = Counter()
        self.basic_acks = 0
        on_message, on_delivered = ConsumerRunner._on_message, ConsumerRunner._on_delivered
        basic_ack = aiormq.Channel.basic_ack

        def slow(runner: ConsumerRunner, message: Any) -> Any:
            self.came["aio-pika"] += 1
            return on_message(runner, message)

        async def fast(runner: ConsumerRunner, message: Any) -> None:
            self.came["direct"] += 1
            await on_delivered(runner, message)

        async def counted_ack(channel: aiormq.Channel, *args: Any, **kwargs: Any) -> None:
            self.basic_acks += 1
            await basic_ack(channel, *args, **kwargs)

        monkeypatch.setattr(ConsumerRunner, "_on_message", slow)
        monkeypatch.setattr(ConsumerRunner, "_on_delivered", fast)
        monkeypatch.setattr(aiormq.Channel, "basic_ack", counted_ack)


def counting(queue: str, seen: Counter[str], **attrs: Any) -> type[EventConsumer]:
    async def handle(self: EventConsumer, event: Event) -> None:
        assert event.attempt == 1 and not event.redelivered
        assert event.accepted_at is not None and event.payload["data"]["n"] >= 0
        seen[event.message_id or ""] += 1

    body = {"queue": queue, "events": ("ONFAST",), "handle": handle, "prefetch": 16, **attrs}
    return type("Counting", (EventConsumer,), body)


async def publish(broker: Broker, queue: str, start: int, count: int) -> set[str]:
    ids = set()
    async with broker.connection.channel() as channel:
        for n in range(start, start + count):
            body = {"event": "ONFAST", "data": {"n": n}, "ts": "1764367200"}
            body["auth"] = {"domain": "acme.bitrix24.com"}
            message = aio_pika.Message(
                json.dumps(body).encode(),
                message_id=f"fast-{n}",
                timestamp=1764367200,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await channel.default_exchange.publish(message, routing_key=queue)
            ids.add(f"fast-{n}")
    return ids


async def settled(broker: Broker, queue: str) -> bool:
    """Nothing ready and nothing unacked (a message handled but never acked stays unacked)."""
    info = await broker.mgmt.get(f"/api/queues/%2F/{queue}")
    return info.get("messages") == 0 and info.get("messages_unacknowledged") == 0


async def underlay(runner: Any) -> aiormq.Channel:
    channel: aiormq.Channel = await runner._channel.get_underlay_channel()
    return channel


@pytest.mark.skipif(not fast_consume.SUPPORTED, reason="aiormq is not a release it is pinned to")
async def test_deliveries_take_the_direct_path_after_the_first_and_again_after_a_reconnect(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Paths(monkeypatch)
    queue = broker.name("fast")
    seen: Counter[str] = Counter()
    async with Worker(broker.settings, [counting(queue, seen)]) as worker:
        runner = worker.runners[0]
        ids = await publish(broker, queue, 0, 200)
        await wait_until(lambda: set(seen) == ids, what="the first 200 handled")
        # Acked before the connection is cut (a handled one left unacked would come again).
        await wait_until(lambda: settled(broker, queue), what="the first 200 acked")
        channel = await underlay(runner)
        tag = runner._consumer_tag
        assert channel.consumers[tag] == runner._on_delivered
        first = Counter(paths.came)
        # The first delivery comes through aio-pika and takes the channel over; those the reader
        # had already handed out before it ran may come that way too (at most a prefetch).
        assert 1 <= first["aio-pika"] <= 16 and first["direct"] >= 200 - 16

        closed = await broker.mgmt.close_connections(f"worker {queue}")
        assert closed == 1
        ids |= await publish(broker, queue, 200, 200)
        await wait_until(lambda: set(seen) == ids, what="the next 200 handled")
        reopened = await underlay(runner)
        assert reopened is not channel and reopened.consumers[tag] == runner._on_delivered
        assert paths.came["aio-pika"] - first["aio-pika"] >= 1  # the new channel began there
    assert set(seen.values()) == {1}  # none redelivered: each was acked before the close
    assert await broker.depth(queue) == 0  # an unacked one would be back when the worker left
    assert paths.basic_acks == 0  # every ack went as our own frame


async def test_without_the_direct_path_aio_pika_takes_and_acks_every_delivery(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fast_consume, "SUPPORTED", False)
    paths = Paths(monkeypatch)
    queue = broker.name("plain")
    seen: Counter[str] = Counter()
    async with Worker(broker.settings, [counting(queue, seen)]):
        ids = await publish(broker, queue, 0, 100)
        await wait_until(lambda: set(seen) == ids, what="100 handled")
    assert set(seen.values()) == {1} and await broker.depth(queue) == 0
    assert paths.came == Counter({"aio-pika": 100})
    assert paths.basic_acks == 100
