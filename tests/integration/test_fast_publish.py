"""The ingress's direct publish path (`fast_publish`) on the real broker: it is the path taken,
its messages are the ordinary path's, and it gives way to aiormq's own whenever the delivery
tags could otherwise leave in the wrong order."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, cast

import aiormq
import pytest

from b24queue.envelope import envelope_for
from b24queue.errors import PublishError
from b24queue.events import parse_event
from b24queue.testing import make_event
from b24queue.transports.amqp import fast_publish
from b24queue.transports.amqp.publisher import AmqpPublisher
from tests.conftest import SAMPLE_NAMES, sample_form
from tests.integration.conftest import Broker, wait_until

pytestmark = pytest.mark.skipif(
    not fast_publish.SUPPORTED,
    reason=f"aiormq is not one of {sorted(fast_publish.SUPPORTED_AIORMQ)}: no fast path to test",
)


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


async def test_while_the_channel_lock_is_held_it_waits_unnumbered(broker: Broker) -> None:
    """basic_publish numbers its publish under the lock and may wait there for room in the write
    queue: a publish that took its number then would overtake it on the wire. So it waits for
    the lock without a number, and takes one only once its frame is queued."""
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
    """2,000 publishes at once: past the write queue's ten frames they queue behind the channel
    lock; every one is numbered once, confirmed, and arrives once; none took basic_publish."""
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
