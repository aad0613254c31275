"""How often a record was handed to a handler without being settled, for `max_deliveries`: an
event that kills its worker every time must end in the DLQ, not loop for ever.

Kafka keeps no delivery count. A record handed out again by a later owner (under the handout
mark: `redelivered`) is counted in `<queue>.deliveries` (one partition, compacted): one record
per such delivery, keyed by the record it counts (compaction keeps its latest count),
acknowledged before its handler runs, naming the topic, partition, offset and count. The topic
is read whole when partitions are assigned with redeliveries ahead; it grows only by a record
per redelivery (crashes and rebalances), not per event.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from b24queue.settings import Settings
from b24queue.transports.kafka.client import consumer


def deliveries_topic(queue: str) -> str:
    return f"{queue}.deliveries"


def _key(value: dict[str, Any]) -> bytes:
    """The topic is compacted: a record's key is what it counts (its latest count is kept)."""
    return f"{value['topic']}:{value['partition']}:{value['offset']}".encode()


class DeliveryCounts:
    def __init__(self, settings: Settings, producer: AIOKafkaProducer, queue: str) -> None:
        self._settings = settings
        self._producer = producer
        self._topic = deliveries_topic(queue)
        self._counts: dict[tuple[str, int, int], int] = {}

    def next(self, tp: TopicPartition, offset: int) -> int:
        """The count this delivery makes (the first delivery was 1)."""
        return self._counts.get((tp.topic, tp.partition, offset), 1) + 1

    async def load(self) -> None:
        reader = consumer(self._settings, "b24queue deliveries", None)
        await reader.start()
        try:
            tp = TopicPartition(self._topic, 0)
            reader.assign([tp])
            await reader.seek_to_beginning(tp)
            end = (await reader.end_offsets([tp]))[tp]
            while True:  # past the end offset too: Tansu reports it too low (see dlq.py)
                behind = await reader.position(tp) < end
                found = await reader.getmany(tp, timeout_ms=1000 if behind else 200)
                if not found and not behind:
                    break
                for record in found.get(tp, []):
                    self._note(json.loads(record.value or b"{}"))
        finally:
            await reader.stop()

    def _note(self, value: dict[str, Any]) -> None:
        key = (str(value["topic"]), int(value["partition"]), int(value["offset"]))
        self._counts[key] = max(self._counts.get(key, 1), int(value["count"]))

    async def record(self, items: list[tuple[TopicPartition, int, int]]) -> None:
        values = [
            {"topic": tp.topic, "partition": tp.partition, "offset": offset, "count": count}
            for tp, offset, count in items
        ]
        await asyncio.gather(
            *(
                self._producer.send_and_wait(self._topic, json.dumps(v).encode(), key=_key(v))
                for v in values
            )
        )
        for value in values:
            self._note(value)
