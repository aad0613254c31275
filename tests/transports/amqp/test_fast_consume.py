"""The worker's direct delivery path (`fast_consume`) on the real broker: after a channel's first
delivery its deliveries skip aio-pika's wrapper and are acked by frames of our own, again after
a reconnect; and where the direct path cannot be used, aio-pika's path does all of it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from typing import Any

import aio_pika
import aiormq
import pytest
from aiormq.abc import ChannelFrame
from pamqp import frame
from pamqp.heartbeat import Heartbeat

from b24queue import Event, EventConsumer
from b24queue import _constants as c
from b24queue.transports.amqp import fast_consume, internals
from b24queue.transports.amqp.runner import ConsumerRunner
from b24queue.worker import Worker
from tests.support.rabbitmq import AMQP_URL, Broker
from tests.support.wait import wait_until

pytestmark = pytest.mark.broker


class Paths:
    """Counts deliveries by the way they came, and acks by the way they went."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.came: Counter[str] = Counter()
        self.basic_acks = 0
        self.channel_tasks = 0  # tasks aiormq's channels started (one per delivery on its path)
        on_message, on_delivered = ConsumerRunner._on_message, ConsumerRunner._on_delivered
        basic_ack = aiormq.Channel.basic_ack
        create_task = aiormq.Channel.create_task

        def slow(runner: ConsumerRunner, message: Any) -> Any:
            self.came["aio-pika"] += 1
            return on_message(runner, message)

        def fast(runner: ConsumerRunner, message: Any) -> None:
            self.came["direct"] += 1
            on_delivered(runner, message)

        async def counted_ack(channel: aiormq.Channel, *args: Any, **kwargs: Any) -> None:
            self.basic_acks += 1
            await basic_ack(channel, *args, **kwargs)

        def counted_task(channel: aiormq.Channel, coro: Any) -> Any:
            self.channel_tasks += 1
            return create_task(channel, coro)

        monkeypatch.setattr(ConsumerRunner, "_on_message", slow)
        monkeypatch.setattr(aiormq.Channel, "create_task", counted_task)
        monkeypatch.setattr(ConsumerRunner, "_on_delivered", fast)
        monkeypatch.setattr(aiormq.Channel, "basic_ack", counted_ack)


def counting(queue: str, seen: Counter[str], **attrs: Any) -> type[EventConsumer]:
    async def handle(self: EventConsumer, event: Event) -> None:
        assert event.attempt == 1 and not event.redelivered
        assert event.accepted_at is not None and event.payload["data"]["n"] >= 0
        seen[event.message_id or ""] += 1

    body = {"queue": queue, "events": ("ONFAST",), "handle": handle, "prefetch": 16, **attrs}
    return type("Counting", (EventConsumer,), body)


async def publish(
    broker: Broker, queue: str, start: int, count: int, *, routed: bool = False
) -> set[str]:
    """Straight to `queue`, or `routed` through the test's events exchange as four portals'
    (to a fair queue's shards)."""
    ids = set()
    async with broker.connection.channel() as channel:
        events = await channel.get_exchange(broker.settings.exchange) if routed else None
        for n in range(start, start + count):
            body = {"event": "ONFAST", "data": {"n": n}, "ts": "1764367200"}
            body["auth"] = {"domain": "acme.bitrix24.com"}
            message = aio_pika.Message(
                json.dumps(body).encode(),
                message_id=f"fast-{n}",
                timestamp=1764367200,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={c.H_MEMBER_ID: f"portal{n % 4}"},
            )
            if events is not None:
                await events.publish(message, routing_key="ONFAST")
            else:
                await channel.default_exchange.publish(message, routing_key=queue)
            ids.add(f"fast-{n}")
    return ids


async def settled(broker: Broker, queue: str) -> bool:
    """Nothing ready and nothing unacked (a message handled but never acked stays unacked), in
    the queue and its shards."""
    rows = await broker.mgmt.get("/api/queues/%2F?columns=name,messages,messages_unacknowledged")
    mine = [r for r in rows if r["name"] == queue or r["name"].startswith(queue + ".s")]
    return bool(mine) and all(
        r.get("messages") == 0 and r.get("messages_unacknowledged") == 0 for r in mine
    )


async def underlay(runner: Any) -> aiormq.Channel:
    channel: aiormq.Channel = await runner._channel.get_underlay_channel()
    return channel


@pytest.mark.parametrize(
    "fair",
    [False, pytest.param(True, marks=pytest.mark.long)],  # 10 s: make faults runs it
    ids=["one-queue", "fair-shards"],
)
async def test_deliveries_take_the_direct_path_after_the_first_and_again_after_a_reconnect(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, fair: bool
) -> None:
    paths = Paths(monkeypatch)
    queue = broker.name("fast")
    seen: Counter[str] = Counter()
    # A fair queue: four portals' events through its shards (and its own queue, consumed too).
    async with Worker(broker.settings, [counting(queue, seen, fair_share=fair)]) as worker:
        runner = worker.runners[0]
        ids = await publish(broker, queue, 0, 200, routed=fair)
        await wait_until(lambda: set(seen) == ids, what="the first 200 handled")
        # Acked before the connection is cut (a handled one left unacked would come again).
        await wait_until(lambda: settled(broker, queue), what="the first 200 acked")
        channel = await underlay(runner)
        taken = getattr(channel, fast_consume.DELIVERIES)
        tags = [tag for _, tag in runner._consumers]
        assert len(tags) == (17 if fair else 1)
        assert {taken.get(t) for t in tags if t in taken} == {runner._on_delivered}
        first = Counter(paths.came)
        # The first delivery of each consumer comes through aio-pika and takes the channel
        # over; those the reader had already handed out before it ran may come that way too (at
        # most a prefetch, and its sources': 16 one queue, 4 portals x 48 fair).
        most = 4 * 48 if fair else 16
        assert 1 <= first["aio-pika"] <= most and first["direct"] >= 200 - most
        # No task of aiormq's per direct delivery (200 here); its channels start a few of their
        # own (readers, the test's publishing channel; a fair queue's 17 consumers more).
        assert paths.channel_tasks - first["aio-pika"] < (100 if fair else 50)

        closed = await broker.mgmt.close_connections(f"worker {queue}")
        assert closed == 1
        ids |= await publish(broker, queue, 200, 200, routed=fair)
        await wait_until(lambda: set(seen) == ids, what="the next 200 handled")
        reopened = await underlay(runner)
        assert reopened is not channel
        retaken = getattr(reopened, fast_consume.DELIVERIES)
        assert {retaken.get(t) for t in tags if t in retaken} == {runner._on_delivered}
        assert paths.came["aio-pika"] - first["aio-pika"] >= 1  # the new channel began there
    assert set(seen.values()) == {1}  # none redelivered: each was acked before the close
    assert await settled(broker, queue)  # an unacked one would be back when the worker left
    assert paths.basic_acks == 0  # every ack went as our own frame


async def test_without_the_direct_path_aio_pika_takes_and_acks_every_delivery(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(internals, "ON", dataclasses.replace(internals.ON, consume=False))
    paths = Paths(monkeypatch)
    queue = broker.name("plain")
    seen: Counter[str] = Counter()
    async with Worker(broker.settings, [counting(queue, seen)]):
        ids = await publish(broker, queue, 0, 100)
        await wait_until(lambda: set(seen) == ids, what="100 handled")
    assert set(seen.values()) == {1} and await broker.depth(queue) == 0
    assert paths.came == Counter({"aio-pika": 100})
    assert paths.basic_acks == 100


# 9 s: long, run by make faults (make test within its ten minutes).
@pytest.mark.long
async def test_a_delivery_whose_start_fails_is_handed_back_and_the_channel_goes_on(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The direct callback runs in the channel's reader: an error there must not end the
    reader (nothing more would be delivered), nor keep the delivery unacked until the channel
    closes (a prefetch slot gone meanwhile): it is handed back, and comes again."""
    on_delivered = ConsumerRunner._on_delivered
    failed: list[str] = []

    def fails_once(runner: ConsumerRunner, message: Any) -> None:
        if not failed:
            failed.append(message.header.properties.message_id)
            raise RuntimeError("could not start")
        on_delivered(runner, message)

    monkeypatch.setattr(ConsumerRunner, "_on_delivered", fails_once)
    queue = broker.name("start-fails")
    seen: Counter[str] = Counter()
    redelivered: list[str] = []

    async def handle(self: EventConsumer, event: Event) -> None:
        seen[event.message_id or ""] += 1
        if event.redelivered:
            redelivered.append(event.message_id or "")

    consumer = type(
        "Recording", (EventConsumer,), {"queue": queue, "events": ("ONFAST",), "handle": handle}
    )
    async with Worker(broker.settings, [consumer]):
        ids = await publish(broker, queue, 0, 60)
        await wait_until(lambda: set(seen) == ids, what="all 60 handled, the failed one too")
        await wait_until(lambda: settled(broker, queue), what="all acked")
    assert redelivered == failed and set(seen.values()) == {1}


async def _got(broker: Broker, queue: str, count: int) -> tuple[Any, aiormq.Channel, list[int]]:
    """`count` messages fetched unacked on a channel of the test's connection: their tags."""
    await publish(broker, queue, 0, count)
    channel = await broker.connection.channel()
    underlay: aiormq.Channel = await channel.get_underlay_channel()
    tags = [
        (await underlay.basic_get(queue, no_ack=False)).delivery.delivery_tag for _ in range(count)
    ]
    return channel, underlay, tags


async def declared(broker: Broker, suffix: str) -> str:
    queue = broker.name(suffix)
    async with broker.connection.channel() as channel:
        await channel.declare_queue(queue, durable=True)
    return queue


async def test_acks_wait_for_room_in_a_full_write_queue_and_then_all_go(broker: Broker) -> None:
    queue = await declared(broker, "acks-full")
    channel, underlay, tags = await _got(broker, queue, 3)
    loop = asyncio.get_running_loop()
    heartbeat = ChannelFrame(payload=frame.marshal(Heartbeat(), 0), should_close=False)

    def writer_behind() -> None:  # runs just before the acks' write, as if the writer lagged
        while not underlay.write_queue.full():
            underlay.write_queue.put_nowait(heartbeat)

    seen_waiting = []
    acks = fast_consume.Acks()
    loop.call_soon(writer_behind)
    for tag in tags:
        acks.add(underlay, tag)
    loop.call_soon(lambda: seen_waiting.append(sum(map(len, acks._waiting.values()))))
    await acks.written(timeout_s=5)
    assert seen_waiting == [3]  # the full queue held them back: nothing was put past its bound
    assert not acks._waiting
    await channel.close()  # unacked ones would now be back in the queue
    assert await broker.depth(queue) == 0


async def test_acks_of_a_channel_that_is_closing_are_dropped_not_sent_behind_its_close(
    broker: Broker,
) -> None:
    """An ack behind its channel's Close would reach the broker on a closed channel, which
    closes the whole connection: acks of a channel found closing are dropped instead, and the
    broker redelivers those messages."""
    queue = await declared(broker, "acks-closing")
    await publish(broker, queue, 0, 3)
    connection = await aio_pika.connect_robust(
        AMQP_URL, client_properties={"connection_name": f"pytest acks {broker.prefix}"}
    )
    try:
        channel = await connection.channel()
        underlay: aiormq.Channel = await channel.get_underlay_channel()
        tags = [
            (await underlay.basic_get(queue, no_ack=False)).delivery.delivery_tag for _ in range(3)
        ]
        acks = fast_consume.Acks()
        for tag in tags:
            acks.add(underlay, tag)
        # Closing before the turn ends, as aiormq marks it on the broker's Channel.Close.
        getattr(underlay, internals.CLOSE_EVENT).set()
        await acks.written(timeout_s=5)
        assert not acks._waiting
        with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
            acks.add(underlay, tags[0])
    finally:
        await connection.close()  # what it still held unacked goes back to the queue
    assert await broker.depth(queue) == 3  # none of the three was acked
