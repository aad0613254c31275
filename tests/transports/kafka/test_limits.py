"""The Kafka transport's delivery limit on the tests' Tansu: it counts only records that were
handed out and never settled, not their handled neighbours held above the commit point."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.support.bench import Bench
from tests.support.consumers import KillsOnUpdate, record_done, record_starts
from tests.support.kafka_server import KafkaServer, kafka_settings
from tests.support.processes import env_for, start_workers, stop
from tests.support.wait import wait_until


async def _settled_marks(bootstrap: str, topic: str) -> int:
    """How many offsets the settled marks of `topic` name (the latest mark per partition)."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await reader.start()
    try:
        tp = TopicPartition(topic, 0)
        reader.assign([tp])
        await reader.seek_to_beginning(tp)
        latest: dict[bytes, int] = {}
        for records in (await reader.getmany(tp, timeout_ms=500)).values():
            for record in records:
                value = json.loads(record.value or b"{}")
                if "ranges" in value and record.key is not None:
                    latest[record.key] = sum(b - a for a, b in value["ranges"])
        return sum(latest.values())
    finally:
        await reader.stop()


@pytest.mark.fault
async def test_a_poison_event_does_not_drag_its_handled_neighbours_to_the_dlq(
    tansu: KafkaServer, tmp_path: Path
) -> None:
    """One portal (one partition): the poison event first, ten handled after it; it kills
    its worker each time, holding the commit point below them. Past max_deliveries only it is
    dead-lettered: the ten are settled, and a later owner passes over them."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    bench = Bench(kafka_settings(tansu, prefix), prefix)
    record, go = tmp_path / "record.txt", tmp_path / "go"
    queue = bench.name("neighbours")
    env = env_for(
        bench.settings,
        record,
        B24QT_QUEUE=queue,
        B24QT_MAX_DELIVERIES="2",
        B24QT_PREFETCH="16",
        B24QT_GO=str(go),
    )
    await bench.transport.declare([type("Neighbours", (KillsOnUpdate,), {"queue": queue})])
    [poison, *handled] = await bench.post("crm-deal-update", *["crm-deal-add"] * 10)
    consumer_ = "tests.support.consumers:KillsOnUpdate"
    async with bench.transport.dead_letters(queue) as dlq:
        [worker] = await start_workers(env, tmp_path, consumer_, 1)
        await wait_until(lambda: record_done(record) >= set(handled), 30, "the ten handled")

        async def marked() -> bool:
            return await _settled_marks(tansu.bootstrap, f"{queue}.deliveries") >= 10

        await wait_until(marked, 30, "the ten noted settled above the commit point")
        go.touch()
        assert await asyncio.wait_for(worker.wait(), 30) != 0
        [worker] = await start_workers(env, tmp_path, consumer_, 1)  # the poison's 2nd delivery
        assert await asyncio.wait_for(worker.wait(), 60) != 0
        [worker] = await start_workers(env, tmp_path, consumer_, 1)

        async def dead() -> bool:
            return await dlq.count() >= 1

        await wait_until(dead, 60, "the poison event dead-lettered")
        assert await stop(worker) == 0
        _, letters = await dlq.list(50)
    assert [(x.message_id, x.reason) for x in letters] == [(poison, "delivery_limit")]
    starts = record_starts(record)
    assert sorted(m for m, _ in starts) == sorted([poison, poison, *handled]), starts
    assert (poison, "1") in starts
