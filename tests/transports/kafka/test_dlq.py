"""`dlq list` and `status` on the Kafka transport, on the tests' Tansu, while dead letters keep
coming: they read to where the topic ended when they began, and finish."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from b24queue.transports.kafka import dlq as dlq_module
from tests.support.bench import Bench
from tests.support.consumers import Recorder
from tests.support.kafka_server import KafkaServer, kafka_settings
from tests.support.wait import wait_until


async def test_counting_dead_letters_finishes_under_a_steady_inflow(tansu: KafkaServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    bench = Bench(kafka_settings(tansu, prefix), prefix)
    queue = bench.name("busy")
    await bench.transport.declare([type("Busy", (Recorder,), {"queue": queue})])
    sender = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, acks="all")
    await sender.start()
    sent = 0

    async def inflow() -> None:
        nonlocal sent
        while True:  # one record per request, one after the other: always something new
            headers = [("m", uuid.uuid4().hex.encode()), ("h", b"{}")]
            await sender.send_and_wait(f"{queue}.dlq", b"{}", headers=headers)
            sent += 1

    flowing = asyncio.create_task(inflow())
    try:
        await wait_until(lambda: sent >= 20, 15, "the inflow under way")
        before = sent
        async with bench.transport.dead_letters(queue) as dlq:
            count, rows = await asyncio.wait_for(dlq.list(5), 15)
        assert count >= before and len(rows) == 5
        status = await asyncio.wait_for(bench.transport.status(), 15)
        [row] = [r for r in status.queues if r.queue == queue]
        assert row.dead_letters >= before
    finally:
        flowing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flowing
        await sender.stop()


async def test_a_purge_writes_its_markers_in_chunks(
    tansu: KafkaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A marker lists the offsets it removes in a header: one for 100,000 letters would pass
    the broker's message.max.bytes; chunks of MARK_CHUNK (made 2 here) cannot."""
    monkeypatch.setattr(dlq_module, "MARK_CHUNK", 2)
    prefix = f"t{uuid.uuid4().hex[:10]}"
    bench = Bench(kafka_settings(tansu, prefix), prefix)
    queue = bench.name("purged")
    await bench.transport.declare([type("Purged", (Recorder,), {"queue": queue})])
    sender = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, acks="all")
    await sender.start()
    try:
        for _ in range(5):
            headers = [("m", uuid.uuid4().hex.encode()), ("h", b"{}")]
            await sender.send_and_wait(f"{queue}.dlq", b"{}", headers=headers)
    finally:
        await sender.stop()
    async with bench.transport.dead_letters(queue) as dlq:
        assert await dlq.count() == 5
        assert await dlq.purge(5) == 5
        assert await dlq.count() == 0
    reader = AIOKafkaConsumer(bootstrap_servers=tansu.bootstrap, enable_auto_commit=False)
    await reader.start()
    try:
        tp = TopicPartition(f"{queue}.dlq", 0)
        reader.assign([tp])
        await reader.seek_to_beginning(tp)
        markers: list[bytes] = []
        async with asyncio.timeout(10):  # the five letters and the markers
            while await reader.position(tp) < 8:
                for record in (await reader.getmany(tp, timeout_ms=500)).get(tp, []):
                    markers += [bytes(v) for k, v in record.headers if k == dlq_module.H_REMOVES]
    finally:
        await reader.stop()
    assert markers == [b"0,1", b"2,3", b"4"]
