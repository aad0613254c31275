"""The ingress's direct publish path (`fast_publish`) on the real broker: it is the path taken,
its messages are the ordinary path's, and it gives way to aiormq's own whenever the delivery
tags could otherwise leave in the wrong order."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from typing import Any, cast

import aio_pika
import aiormq
import pytest
from aiormq.abc import ChannelFrame
from pamqp import frame
from pamqp.heartbeat import Heartbeat

from b24queue.errors import PublishError
from b24queue.events.envelope import envelope_for
from b24queue.events.event import parse_event
from b24queue.testing import make_event
from b24queue.transports.amqp import fast_publish, internals
from b24queue.transports.amqp.publisher import AmqpPublisher, properties_for
from tests.support.rabbitmq import AMQP_URL, Broker
from tests.support.samples import SAMPLE_NAMES, sample_form
from tests.support.wait import wait_until

pytestmark = pytest.mark.broker


class Paths:
    """Counts the publishes that went through aiormq's basic_publish."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ordinary = 0
        original = aiormq.Channel.basic_publish

        async def counted(channel: aiormq.Channel, *args: Any, **kwargs: Any) -> Any:
            self.ordinary += 1
            return await original(channel, *args, **kwargs)

        monkeypatch.setattr(aiormq.Channel, "basic_publish", counted)


async def started(publisher: AmqpPublisher) -> aiormq.Channel:
    await asyncio.wait_for(publisher.connected.wait(), 10)
    assert publisher._channel is not None
    return cast(aiormq.Channel, await publisher._channel.get_underlay_channel())


async def test_samples_go_the_direct_way_and_arrive_as_the_ordinary_way_sends_them(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Paths(monkeypatch)
    queue = await broker.bind_queue("all", "#")
    envelopes = [
        envelope_for(parse_event("application/x-www-form-urlencoded", sample_form(name)))
        for name in SAMPLE_NAMES
    ]
    async with AmqpPublisher(broker.settings, f"pytest fast {broker.prefix}") as publisher:
        await started(publisher)
        for envelope in envelopes:
            await publisher.publish(envelope)
    assert paths.ordinary == 0
    got = {m.message_id: m for m in await broker.take(queue, len(envelopes))}
    for envelope in envelopes:
        m = got[envelope.message_id]
        assert m.body == envelope.body
        assert m.routing_key == envelope.routing_key
        assert m.delivery_mode == 2 and m.type == envelope.event_type
        assert m.content_type == "application/json" and m.app_id == "b24queue"
        assert m.headers == envelope.headers
        assert m.timestamp == envelope.timestamp.replace(microsecond=0)


async def test_without_the_direct_path_every_publish_takes_basic_publish(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an aiormq release the direct path was not checked on (`internals.ON.publish` off),
    the publisher takes aiormq's own basic_publish, and the same events arrive."""
    monkeypatch.setattr(internals, "ON", dataclasses.replace(internals.ON, publish=False))
    paths = Paths(monkeypatch)
    queue = await broker.bind_queue("plain", "ONCRMDEALADD")
    envelopes = [envelope_for(make_event("ONCRMDEALADD", {"N": str(i)})) for i in range(20)]
    async with AmqpPublisher(broker.settings, f"pytest fast {broker.prefix}") as publisher:
        channel = await started(publisher)
        await asyncio.gather(*(publisher.publish(e) for e in envelopes))
        assert getattr(channel, fast_publish._BATCH, None) is None  # never batched
    assert paths.ordinary == len(envelopes)
    got = Counter(m.message_id for m in await broker.take(queue, len(envelopes)))
    assert set(got) == {e.message_id for e in envelopes} and max(got.values()) == 1


async def test_while_the_channel_lock_is_held_it_waits_unnumbered(broker: Broker) -> None:
    """basic_publish numbers its publish under the lock and may wait there for room in the write
    queue: a publish that took its number then would overtake it on the wire. So it waits for
    the lock without a number, and takes one only once it holds the lock (its batch's)."""
    envelope = envelope_for(make_event("ONCRMDEALADD"))
    async with AmqpPublisher(broker.settings, f"pytest fast {broker.prefix}") as publisher:
        channel = await started(publisher)
        before = channel.delivery_tag
        async with channel.lock:
            waiting = asyncio.create_task(publisher.publish(envelope))
            for _ in range(20):  # a publish that ignored the lock would be numbered at once
                await asyncio.sleep(0)
            assert not waiting.done() and channel.delivery_tag == before
        await asyncio.wait_for(waiting, 10)
        assert channel.delivery_tag == before + 1


async def test_a_burst_fills_the_write_queue_and_every_publish_is_confirmed_once(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 publishes at once, in batches of at most MAX_BYTES: every one is numbered once,
    confirmed, and arrives once; none took basic_publish."""
    paths = Paths(monkeypatch)
    queue = await broker.bind_queue("burst", "ONCRMDEALADD")
    envelopes = [envelope_for(make_event("ONCRMDEALADD", {"N": str(i)})) for i in range(2000)]
    async with AmqpPublisher(broker.settings, f"pytest fast {broker.prefix}") as publisher:
        channel = await started(publisher)
        before = channel.delivery_tag
        await asyncio.gather(*(publisher.publish(e) for e in envelopes))
        assert channel.delivery_tag == before + len(envelopes)
        assert not channel.confirmations and not channel.message_id_delivery_tag
    assert paths.ordinary == 0
    got = Counter(m.message_id for m in await broker.take(queue, len(envelopes)))
    assert set(got) == {e.message_id for e in envelopes} and max(got.values()) == 1


async def test_an_unroutable_publish_is_returned_to_its_own_caller(broker: Broker) -> None:
    """With nothing behind the alternate exchange the broker returns the message (mandatory):
    the return names it by message id, and only its own publish fails."""
    async with AmqpPublisher(broker.settings, f"pytest fast {broker.prefix}") as publisher:
        await started(publisher)
        routed = await broker.bind_queue("routed", "ONCRMDEALADD")
        await broker.mgmt.delete(f"/api/queues/%2F/{broker.settings.unrouted}")
        lost, kept = envelope_for(make_event("ONTASKADD")), envelope_for(make_event("ONCRMDEALADD"))
        results = await asyncio.gather(
            publisher.publish(lost), publisher.publish(kept), return_exceptions=True
        )
    assert isinstance(results[0], PublishError) and results[0].returned
    assert results[1] is None
    await wait_until(lambda: broker.depth(routed), what="the routed event")


class Frames:
    """What goes on a channel's write queue, frame by frame; for a batch's frame, the bytes it
    gave the writer (it has them only then, and gives them once)."""

    def __init__(self, channel: aiormq.Channel) -> None:
        self.frames: list[ChannelFrame] = []
        self.written: dict[int, bytes] = {}
        queue = channel.write_queue
        put_nowait = queue.put_nowait

        def counted(item: ChannelFrame) -> None:
            self.frames.append(item)
            if isinstance(item, fast_publish._Frame):
                batch, take = item.batch, item.batch.take

                def recorded() -> bytes:
                    data = take()
                    if data:
                        self.written[id(batch)] = data
                    return data

                batch.take = recorded  # type: ignore[method-assign]
            put_nowait(item)

        queue.put_nowait = counted  # type: ignore[method-assign]

    @property
    def payloads(self) -> list[bytes]:
        return [
            self.written.get(id(f.batch), b"") if isinstance(f, fast_publish._Frame) else f.payload
            for f in self.frames
        ]

    def publishing(self) -> list[bytes]:
        """The frames that carry publishes (Basic.Publish: class 60, method 40)."""
        return [p for p in self.payloads if b"\x00\x3c\x00\x28" in p]

    def publishes(self) -> int:
        return sum(p.count(b"\x00\x3c\x00\x28") for p in self.payloads)


def numbering(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Each publish's delivery tag as `fast_publish` numbers it, by message id."""
    numbered: dict[str, int] = {}
    original = fast_publish._numbered

    def spy(ch: aiormq.Channel, message_id: str) -> asyncio.Future[Any]:
        future = original(ch, message_id)
        numbered[message_id] = ch.delivery_tag
        return future

    monkeypatch.setattr(fast_publish, "_numbered", spy)
    return numbered


async def test_the_publishes_of_one_turn_go_out_as_one_frame_in_the_order_they_are_numbered(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = await broker.bind_queue("turn", "ONCRMDEALADD")
    envelopes = [envelope_for(make_event("ONCRMDEALADD", {"N": str(i)})) for i in range(8)]
    async with AmqpPublisher(broker.settings, f"pytest fast {broker.prefix}") as publisher:
        channel = await started(publisher)
        frames = Frames(channel)
        numbered = numbering(monkeypatch)
        await asyncio.gather(*(publisher.publish(e) for e in envelopes))
    assert len(frames.publishing()) == 1 and frames.publishes() == len(envelopes)
    wire = frames.publishing()[0]
    on_the_wire = sorted(envelopes, key=lambda e: wire.index(e.message_id.encode()))
    assert [numbered[e.message_id] for e in on_the_wire] == sorted(numbered.values())
    got = Counter(m.message_id for m in await broker.take(queue, len(envelopes)))
    assert set(got) == {e.message_id for e in envelopes} and max(got.values()) == 1


async def test_a_batch_waits_for_room_in_a_full_write_queue_and_later_publishes_join_it(
    broker: Broker,
) -> None:
    queue = await broker.bind_queue("room", "ONCRMDEALADD")
    first = [envelope_for(make_event("ONCRMDEALADD", {"N": str(i)})) for i in range(3)]
    later = envelope_for(make_event("ONCRMDEALADD", {"N": "later"}))
    heartbeat = ChannelFrame(payload=frame.marshal(Heartbeat(), 0), should_close=False)
    exchange = broker.settings.exchange
    async with AmqpPublisher(broker.settings, f"pytest fast {broker.prefix}") as publisher:
        channel = await started(publisher)
        loop = asyncio.get_running_loop()
        lagging = True

        def writer_behind() -> None:  # keeps the write queue full, turn after turn
            while not channel.write_queue.full():
                channel.write_queue.put_nowait(heartbeat)
            if lagging:
                loop.call_soon(writer_behind)

        writer_behind()
        frames = Frames(channel)
        tasks = [asyncio.create_task(fast_publish.publish(channel, exchange, e)) for e in first]
        await asyncio.sleep(0.05)
        batch = getattr(channel, fast_publish._BATCH)
        held_back = not any(isinstance(f, fast_publish._Frame) for f in frames.frames)
        assert len(batch.payloads) == 3 and held_back  # not put past the queue's bound
        tasks.append(asyncio.create_task(fast_publish.publish(channel, exchange, later)))
        await asyncio.sleep(0.01)
        assert len(batch.payloads) == 4
        lagging = False
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert frames.publishes() == 4 and len(frames.publishing()) == 1  # all four, in one write
    got = Counter(m.message_id for m in await broker.take(queue, 4))
    assert set(got) == {e.message_id for e in [*first, later]} and max(got.values()) == 1


async def test_a_batch_of_a_channel_found_closing_is_dropped_not_sent_behind_its_close(
    broker: Broker,
) -> None:
    """A publish behind its channel's Close would reach the broker on a channel it no longer has
    (it closes the whole connection): a batch whose channel is closing by the end of the turn
    is not sent; its publishes fail, and the ingress tries them again on the new channel."""
    queue = await broker.bind_queue("closing", "ONCRMDEALADD")
    connection = await aio_pika.connect_robust(
        AMQP_URL, client_properties={"connection_name": f"pytest fast {broker.prefix}"}
    )
    try:
        channel = await connection.channel(publisher_confirms=True)
        underlay: aiormq.Channel = await channel.get_underlay_channel()
        frames = Frames(underlay)
        envelopes = [envelope_for(make_event("ONCRMDEALADD", {"N": str(i)})) for i in range(3)]
        tasks = [
            asyncio.create_task(fast_publish.publish(underlay, broker.settings.exchange, e))
            for e in envelopes
        ]
        await asyncio.sleep(0)  # all three joined one batch
        # Closing before the turn ends, as aiormq marks it on the broker's Channel.Close.
        getattr(underlay, internals.CLOSE_EVENT).set()
        await asyncio.sleep(0.1)
        assert len(frames.frames) == 1 and frames.publishing() == []  # taken empty
        assert getattr(underlay, fast_publish._BATCH) is None
        with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
            await fast_publish.publish(underlay, broker.settings.exchange, envelopes[0])
    finally:
        await connection.close()  # fails the confirms still awaited
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, BaseException) for r in results)
    assert await broker.depth(queue) == 0


async def test_a_full_batch_takes_no_more_and_the_next_ones_follow_it_in_order(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past `MAX_BYTES` a batch is closed to newcomers: each of these opens its own, waiting for
    the lock in turn, and each is numbered once, in the order of the frames."""
    monkeypatch.setattr(fast_publish._Batch, "MAX_BYTES", 1)
    queue = await broker.bind_queue("full", "ONCRMDEALADD")
    envelopes = [envelope_for(make_event("ONCRMDEALADD", {"N": str(i)})) for i in range(20)]
    async with AmqpPublisher(broker.settings, f"pytest fast {broker.prefix}") as publisher:
        channel = await started(publisher)
        frames = Frames(channel)
        before = channel.delivery_tag
        await asyncio.gather(*(publisher.publish(e) for e in envelopes))
        assert channel.delivery_tag == before + len(envelopes)
        assert not channel.confirmations and not channel.message_id_delivery_tag
    assert [frame.count(b"\x00\x3c\x00\x28") for frame in frames.publishing()] == [1] * 20
    got = Counter(m.message_id for m in await broker.take(queue, len(envelopes)))
    assert set(got) == {e.message_id for e in envelopes} and max(got.values()) == 1


async def test_while_publishes_await_their_confirms_a_batch_lingers_and_gathers_more(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that starts while an earlier publish awaits its confirm waits LINGER_S first,
    and the publishes of the turns meanwhile join it."""
    monkeypatch.setattr(fast_publish._Batch, "LINGER_S", 0.3)
    queue = await broker.bind_queue("linger", "ONCRMDEALADD")
    envelopes = [envelope_for(make_event("ONCRMDEALADD", {"N": str(i)})) for i in range(3)]
    exchange = broker.settings.exchange
    async with AmqpPublisher(broker.settings, f"pytest fast {broker.prefix}") as publisher:
        channel = await started(publisher)
        frames = Frames(channel)
        never = asyncio.get_running_loop().create_future()
        channel.confirmations[10**9] = never  # an earlier publish, still unconfirmed
        try:
            tasks = []
            for envelope in envelopes:  # each in a turn of its own
                task = fast_publish.publish(channel, exchange, envelope)
                tasks.append(asyncio.create_task(task))
                await asyncio.sleep(0.01)
            batch = getattr(channel, fast_publish._BATCH)
            assert len(batch.payloads) == 3 and not frames.frames  # all waiting, together
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
        finally:
            del channel.confirmations[10**9]
            never.cancel()
    assert len(frames.publishing()) == 1 and frames.publishes() == 3
    got = Counter(m.message_id for m in await broker.take(queue, 3))
    assert set(got) == {e.message_id for e in envelopes} and max(got.values()) == 1


async def test_a_basic_publish_between_two_of_ours_is_numbered_and_sent_after_their_batch(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiormq's basic_publish, called while a batch is open, waits for the lock the batch holds
    until the writer takes it: a publish of ours that joins the batch meanwhile goes out (and is
    numbered) before it, never after."""
    queue = await broker.bind_queue("between", "ONCRMDEALADD")
    first, ordinary, joined = (
        envelope_for(make_event("ONCRMDEALADD", {"N": str(i)})) for i in range(3)
    )
    exchange = broker.settings.exchange
    numbered = numbering(monkeypatch)
    async with AmqpPublisher(broker.settings, f"pytest fast {broker.prefix}") as publisher:
        channel = await started(publisher)
        frames = Frames(channel)
        before = channel.delivery_tag
        tasks = [
            asyncio.create_task(fast_publish.publish(channel, exchange, first)),
            asyncio.create_task(
                channel.basic_publish(
                    ordinary.body,
                    exchange=exchange,
                    routing_key=ordinary.routing_key,
                    properties=properties_for(ordinary),
                    mandatory=True,
                )
            ),
            asyncio.create_task(fast_publish.publish(channel, exchange, joined)),
        ]
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert channel.delivery_tag == before + 3
    assert numbered == {first.message_id: before + 1, joined.message_id: before + 2}
    wire = b"".join(frames.publishing())
    on_the_wire = sorted((first, ordinary, joined), key=lambda e: wire.index(e.message_id.encode()))
    assert on_the_wire == [first, joined, ordinary]
    got = Counter(m.message_id for m in await broker.take(queue, 3))
    assert max(got.values()) == 1 and len(got) == 3


async def test_publishes_waiting_for_the_lock_fail_when_the_connection_dies_under_a_batch(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that dies takes its write queue with it, and a batch's frame on it is never
    taken: the batch lets go as its channel closes, so that the publishes waiting for the lock
    fail at once (the ingress tries them again on the next channel), not wait for ever."""
    monkeypatch.setattr(fast_publish._Batch, "MAX_BYTES", 1)  # the second waits for the lock
    connection = await aiormq.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = broker.settings.exchange
    envelopes = [envelope_for(make_event("ONCRMDEALADD", {"N": str(i)})) for i in range(2)]
    tasks = [asyncio.create_task(fast_publish.publish(channel, exchange, e)) for e in envelopes]
    await asyncio.sleep(0)  # the first one's frame is queued; the second waits for the lock
    assert getattr(channel, fast_publish._BATCH) is not None
    await connection.close()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    # (The first one's confirm fails with what aiormq rejects its futures with on a close.)
    assert all(isinstance(r, Exception) for r in results), results
    assert isinstance(results[1], aiormq.exceptions.ChannelInvalidStateError)
    assert not internals.channel_lock(channel).locked()
