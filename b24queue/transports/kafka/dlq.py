"""`b24queue dlq` on Kafka: a `<queue>.dlq` topic, or the unrouted topic (one partition each).

Kafka deletes no single record, so a replayed or purged one is marked: a record in the same
topic whose `removes` header lists the offsets taken out. The topic read from its start, less
what the markers name, is what `list`, `count` and `replay` see. A replay sends the event to the
events topic naming the queue(s) in `to` (its own queue, or for an unrouted event the queues
bound to it now), acknowledged, and only then writes the marker: a crash in between replays it
twice, never loses it.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from b24queue.settings import Settings
from b24queue.transports.kafka.client import (
    H_TO,
    Names,
    consumer,
    key_of,
    producer,
    read_to_now,
    record_headers,
    row_of,
    salvage,
)
from b24queue.transports.kafka.topics import BindingsLog
from b24queue.transports.kit.leased import Row

H_REMOVES = "removes"
# Offsets per marker: at most ~20 bytes each, so a marker stays near 100 KB, far under the
# 1 MB `message.max.bytes` Kafka has by default (a purge of 100,000 letters writes ten).
MARK_CHUNK = 5000


class TopicLog:
    """One dead-letter topic as read so far: the offsets of its letters and those marked
    removed; no bodies (`rows` reads the few wanted)."""

    def __init__(self, reader: AIOKafkaConsumer, topic: str) -> None:
        self._reader = reader
        self.tp = TopicPartition(topic, 0)
        self.letters: set[int] = set()
        self.removed: set[int] = set()
        self._started = False

    async def load(self) -> list[int]:
        """The live letters' offsets, in order, as of now (see `read_to_now`)."""
        if not self._started:
            self._reader.assign([self.tp])
            await self._reader.seek_to_beginning(self.tp)
            self._started = True
        await read_to_now(self._reader, self.tp, self._read)
        return sorted(self.letters - self.removed)

    def _read(self, record: ConsumerRecord[Any, Any]) -> None:
        removes = dict(record.headers or ()).get(H_REMOVES)
        if removes is not None:
            self.removed |= {int(x) for x in bytes(removes).decode().split(",") if x}
        else:
            self.letters.add(record.offset)


async def rows(reader: AIOKafkaConsumer, tp: TopicPartition, offsets: list[int]) -> list[Row]:
    """The letters at `offsets` (ascending), read with `reader` (its own: it seeks)."""
    if not offsets:
        return []
    wanted, found = set(offsets), dict[int, Row]()
    reader.assign([tp])
    reader.seek(tp, offsets[0])
    while wanted - found.keys() and await reader.position(tp) <= offsets[-1]:
        for record in (await reader.getmany(tp, timeout_ms=1000)).get(tp, []):
            if record.offset in wanted:
                try:
                    found[record.offset] = row_of(record)
                except ValueError:  # not as b24queue writes it: listed all the same
                    found[record.offset] = salvage(record)
    return [found[o] for o in offsets if o in found]


class TopicShelf:
    """The `Shelf` of `tables.TableDeadLetters`, over dead-letter topics."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._names = Names.of(settings)
        self._reader = consumer(settings, "b24queue dlq", None)
        self._fetcher = consumer(settings, "b24queue dlq rows", None)
        self._producer: AIOKafkaProducer | None = None
        self._logs: dict[str, TopicLog] = {}

    async def open(self) -> TopicShelf:
        try:
            await self._reader.start()
            await self._fetcher.start()
        except Exception:
            await self._reader.stop()
            await self._fetcher.stop()
            raise
        return self

    async def _sender(self) -> AIOKafkaProducer:
        """Started at the first replay or purge (`list`, `count` and `status` send nothing);
        `acks=all`, not idempotent: a replay may come twice anyway (see the module's doc)."""
        if self._producer is None:
            self._producer = producer(self._settings, "b24queue dlq", idempotent=False)
            await self._producer.start()
        return self._producer

    async def close(self) -> None:
        await self._reader.stop()
        await self._fetcher.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def _live(self, queue: str) -> list[int]:
        if queue not in self._logs:
            self._logs[queue] = TopicLog(self._reader, queue)
        return await self._logs[queue].load()

    async def exists(self, queue: str) -> bool:
        return queue in await self._reader.topics()

    async def count(self, queue: str) -> int:
        return len(await self._live(queue))

    async def first(self, queue: str, limit: int, after: Any) -> list[Row]:
        live = await self._live(queue)
        wanted = [o for o in live if after is None or o > after][:limit]
        return await rows(self._fetcher, TopicPartition(queue, 0), wanted)

    async def replay(
        self, row: Row, headers: dict[str, Any], back_to: str | None, source: str
    ) -> bool:
        if row.id in self._logs[source].removed:
            return False
        if back_to is not None:
            queues = [back_to]
        else:
            bindings = BindingsLog(self._settings, self._names)
            try:
                await bindings.load()
                queues = bindings.route(row.routing_key)
            finally:
                await bindings.close()
        if not queues:
            return False  # still bound by no queue: it stays
        await (await self._sender()).send_and_wait(
            self._names.events,
            row.body,
            key=key_of(headers),
            headers=record_headers(row, headers, [(H_TO, ",".join(queues))]),
        )
        await self._mark(source, [row.id])
        return True

    async def purge(self, queue: str, count: int) -> int:
        offsets = (await self._live(queue))[:count]
        await self._mark(queue, offsets)
        return len(offsets)

    async def _mark(self, queue: str, offsets: list[int]) -> None:
        if not offsets:
            return
        sender = await self._sender()
        for i in range(0, len(offsets), MARK_CHUNK):  # each marker well under message.max.bytes
            chunk = offsets[i : i + MARK_CHUNK]
            removes = ",".join(str(o) for o in chunk).encode()
            await sender.send_and_wait(queue, b"", headers=[(H_REMOVES, removes)])
            self._logs[queue].removed |= set(chunk)
