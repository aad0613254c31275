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
    record_headers,
    row_of,
    salvage,
)
from b24queue.transports.kafka.topics import BindingsLog
from b24queue.transports.leased import Row

H_REMOVES = "removes"


class TopicLog:
    """One dead-letter topic as read so far: its letters and the offsets marked removed."""

    def __init__(self, reader: AIOKafkaConsumer, topic: str) -> None:
        self._reader = reader
        self.tp = TopicPartition(topic, 0)
        self.letters: dict[int, Row] = {}
        self.removed: set[int] = set()
        self._started = False

    async def load(self) -> list[Row]:
        if not self._started:
            self._reader.assign([self.tp])
            await self._reader.seek_to_beginning(self.tp)
            self._started = True
        end = (await self._reader.end_offsets([self.tp]))[self.tp]
        # To the end offset, then on while records come: Tansu 0.6 reports too low an end
        # offset once one request carried several records (dead letters of concurrent
        # handlers do), so the end offset alone would leave some unread.
        while True:
            behind = await self._reader.position(self.tp) < end
            found = await self._reader.getmany(self.tp, timeout_ms=1000 if behind else 200)
            if not found and not behind:
                break
            for record in found.get(self.tp, []):
                self._read(record)
        return [r for o, r in sorted(self.letters.items()) if o not in self.removed]

    def _read(self, record: ConsumerRecord[Any, Any]) -> None:
        removes = dict(record.headers or ()).get(H_REMOVES)
        if removes is not None:
            self.removed |= {int(x) for x in bytes(removes).decode().split(",") if x}
        else:
            try:
                self.letters[record.offset] = row_of(record)
            except ValueError:  # not as b24queue writes it: listed all the same
                self.letters[record.offset] = salvage(record)


class TopicShelf:
    """The `Shelf` of `tables.TableDeadLetters`, over dead-letter topics."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._names = Names.of(settings)
        self._reader = consumer(settings, "b24queue dlq", None)
        self._producer: AIOKafkaProducer | None = None
        self._logs: dict[str, TopicLog] = {}

    async def open(self) -> TopicShelf:
        try:
            await self._reader.start()
        except Exception:
            await self._reader.stop()
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
        if self._producer is not None:
            await self._producer.stop()

    async def _live(self, queue: str) -> list[Row]:
        if queue not in self._logs:
            self._logs[queue] = TopicLog(self._reader, queue)
        return await self._logs[queue].load()

    async def exists(self, queue: str) -> bool:
        return queue in await self._reader.topics()

    async def count(self, queue: str) -> int:
        return len(await self._live(queue))

    async def first(self, queue: str, limit: int, after: Any) -> list[Row]:
        rows = await self._live(queue)
        return [r for r in rows if after is None or r.id > after][:limit]

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
        rows = (await self._live(queue))[:count]
        await self._mark(queue, [r.id for r in rows])
        return len(rows)

    async def _mark(self, queue: str, offsets: list[int]) -> None:
        if not offsets:
            return
        removes = ",".join(str(o) for o in offsets).encode()
        await (await self._sender()).send_and_wait(queue, b"", headers=[(H_REMOVES, removes)])
        self._logs[queue].removed |= set(offsets)
