"""How often a record was handed to a handler without being settled, for `max_deliveries`: an
event that kills its worker every time must end in the DLQ, not loop for ever.

Kafka keeps no delivery count. A record handed out again by a later owner (under the handout
mark: `redelivered`) is counted in `<queue>.deliveries` (one partition, compacted): one record
per such delivery, keyed by the record it counts (compaction keeps its latest count),
acknowledged before its handler runs, naming the topic, partition, offset and count. The topic
is read whole when partitions are assigned with redeliveries ahead; it grows only by a record
per redelivery (crashes and rebalances), not per event.

Its other records are settled marks, keyed per partition: the records settled above the
partition's commit point (a lower one still open), as offset ranges, written with the commits.
A later owner passes over them: neither handled again nor counted against the delivery limit
(a record that kills every worker would otherwise drag its handled neighbours to the DLQ).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from b24queue.settings import Settings
from b24queue.transports.kafka.client import consumer, read_to_now


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
        self._settled: dict[tuple[str, int], list[list[int]]] = {}

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
            await read_to_now(reader, tp, lambda r: self._note(json.loads(r.value or b"{}")))
        finally:
            await reader.stop()

    def settled(self, tp: TopicPartition) -> set[int]:
        """The records of `tp` an earlier owner noted settled (as loaded)."""
        ranges = self._settled.get((tp.topic, tp.partition), [])
        return {o for start, end in ranges for o in range(start, end)}

    async def note_settled(self, marks: dict[TopicPartition, frozenset[int]]) -> None:
        """Write the settled marks; the latest per partition is what counts (compacted)."""
        sends = []
        for tp, offsets in marks.items():
            value = {"topic": tp.topic, "partition": tp.partition, "ranges": _ranges(offsets)}
            key = f"settled:{tp.topic}:{tp.partition}".encode()
            sends.append(
                self._producer.send_and_wait(self._topic, json.dumps(value).encode(), key=key)
            )
        await asyncio.gather(*sends)

    def _note(self, value: dict[str, Any]) -> None:
        if "ranges" in value:
            where = (str(value["topic"]), int(value["partition"]))
            self._settled[where] = [[int(a), int(b)] for a, b in value["ranges"]]
            return
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


def _ranges(offsets: frozenset[int]) -> list[list[int]]:
    """[start, end) runs: a partition's settled records are mostly contiguous."""
    runs: list[list[int]] = []
    for offset in sorted(offsets):
        if runs and runs[-1][1] == offset:
            runs[-1][1] = offset + 1
        else:
            runs.append([offset, offset + 1])
    return runs
