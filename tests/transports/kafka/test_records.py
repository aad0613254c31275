"""Records b24queue did not write the way it writes them, on the tests' Tansu: produced directly
with aiokafka into a queue's topics. None may hold its partition's commit point for ever: one
addressed to the queue that cannot be read goes to the DLQ as `malformed`, one that cannot be
addressed to it is passed over."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from b24queue.delivery import Outcome
from b24queue.errors import PublishError
from b24queue.queues import spec_for
from b24queue.transports.kafka.client import producer
from b24queue.transports.kafka.settle import OutcomeWriter
from b24queue.transports.kit.leased import Row
from tests.support.bench import Bench
from tests.support.consumers import Recorder, record_done
from tests.support.kafka_server import KafkaServer, kafka_settings
from tests.support.processes import env_for, start_workers, stop
from tests.support.wait import wait_until

MEMBER = b"5f2a9c3e1b7d4a6f8e0c2b4d6f8a0c1e"  # the samples' portal: their partition


def _headers(to: bytes, **override: bytes) -> list[tuple[str, bytes]]:
    base = {
        "m": uuid.uuid4().hex.encode(),
        "k": b"ONCRMDEALADD",
        "e": b"ONCRMDEALADD",
        "t": b"2026-01-01T00:00:00+00:00",
        "h": b"{}",
        "to": to,
    }
    return list((base | override).items())


@pytest.mark.long  # 9 s: make faults runs it (make test's ten minutes)
async def test_malformed_records_go_to_the_dlq_and_never_hold_the_commit_point(
    tansu: KafkaServer, tmp_path: Path
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    bench = Bench(kafka_settings(tansu, prefix), prefix)
    record = tmp_path / "record.txt"
    queue = bench.name("odd")
    spec = spec_for(type("Odd", (Recorder,), {"queue": queue}))
    await bench.transport.declare([type("Odd", (Recorder,), {"queue": queue})])
    events, retry = f"{prefix}.events", spec.retry_queue(spec.retry_delays_s[0])
    to = queue.encode()
    body = b'{"event": "ONCRMDEALADD", "data": {}}'
    sender = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, acks="all")
    await sender.start()
    try:
        sent = [
            await sender.send_and_wait(events, body, key=MEMBER, headers=h)
            for h in (
                _headers(to, h=b"not json"),
                _headers(to, h=b"[1, 2]"),
                _headers(to, t=b"yesterday"),
                _headers(to, m=b"\xff\xfe"),
                _headers(b"\xff\xfe"),  # addressed to nobody readable: passed over
            )
        ]
        await sender.send_and_wait(retry, body, key=MEMBER, headers=_headers(to, due=b"soon"))
        due = str(int(time.time() * 1000)).encode()
        await sender.send_and_wait(retry, body, key=MEMBER, headers=_headers(to, due=b"\xff" + due))
    finally:
        await sender.stop()
    [good] = await bench.post("crm-deal-add")  # after them, in the same partition
    env = env_for(bench.settings, record, B24QT_QUEUE=queue)
    [worker] = await start_workers(env, tmp_path, "tests.support.consumers:Recorder", 1)
    group = AIOKafkaConsumer(bootstrap_servers=tansu.bootstrap, group_id=queue)
    await group.start()
    try:
        async with bench.transport.dead_letters(queue) as dlq:
            await wait_until(lambda: good in record_done(record), 30, "the good event handled")

            async def dead() -> bool:
                return await dlq.count() >= 6

            await wait_until(dead, 30, "the malformed records dead-lettered")
            _, letters = await dlq.list(50)
            tp = TopicPartition(events, sent[0].partition)

            async def committed() -> bool:
                return (await group.committed(tp) or 0) > sent[-1].offset + 1

            await wait_until(committed, 30, "the commit point past them all")
        assert await stop(worker) == 0
    finally:
        await group.stop()
        if worker.returncode is None:
            worker.kill()
    assert sorted(x.reason for x in letters) == ["malformed"] * 6, letters
    said = (tmp_path / "worker0.log").read_text()
    assert f"offset {sent[4].offset}: its 'to' header is not UTF-8" in said, said[-2000:]


async def test_a_copy_kafka_refuses_for_its_size_is_not_tried_for_ever(
    tansu: KafkaServer,
) -> None:
    """A retry or dead-letter copy larger than the producer (or the broker) takes fails the
    same way every time: the settlement stops with a permanent PublishError naming the topic
    (the original stays open: held, and said in the log), instead of looping."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = kafka_settings(tansu, prefix)
    spec = spec_for(type("Big", (Recorder,), {"queue": f"{prefix}.big"}))
    sender = producer(settings, "test", idempotent=False)
    await sender.start()
    try:
        row = Row(
            id=0,
            message_id="m1",
            routing_key="ONCRMDEALADD",
            body=b"x" * (17 * 1024 * 1024),  # over the producer's 16 MiB max_request_size
            headers={},
            timestamp=datetime.now(UTC),
            event_type="ONCRMDEALADD",
            deliveries=1,
            fence=1,
        )
        outcome = Outcome("dead_letter", 1, reason="rejected")
        with pytest.raises(PublishError, match=r"\.dlq") as raised:
            await asyncio.wait_for(OutcomeWriter(sender, spec).settle(row, None, outcome), 30)
        assert raised.value.permanent
    finally:
        await sender.stop()
