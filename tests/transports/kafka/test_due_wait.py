"""The Kafka runner's wait for a retry record's due time, without a broker: when the time
comes, its partition resumes and the read loop, which may wait with every partition paused, is
woken (else it slept until some handler ended)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from b24queue.transports.kafka.runner import KafkaRunner

RETRY = TopicPartition("q.retry.1", 0)


@dataclass
class _Consumer:
    """What `_wait_until_due` calls of the client: which partitions are paused."""

    paused: set[TopicPartition] = field(default_factory=set)

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp)

    def resume(self, tp: TopicPartition) -> None:
        self.paused.discard(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        pass


@dataclass
class _Part:
    tp: TopicPartition


class _Owns:
    def owns(self, part: _Part) -> bool:
        return True


async def test_a_retry_record_coming_due_resumes_its_partition_and_wakes_the_read_loop() -> None:
    runner = KafkaRunner.__new__(KafkaRunner)
    kafka = _Consumer()
    runner._kafka = kafka  # type: ignore[assignment]
    runner._offsets = _Owns()  # type: ignore[assignment]
    runner._full, runner._due_wait, runner._room = set(), set(), asyncio.Event()
    runner._wait_until_due(_Part(RETRY), 5, 0.05)  # type: ignore[arg-type]
    assert kafka.paused == {RETRY} and runner._due_wait == {RETRY}
    assert not runner._room.is_set()  # the loop waits here with every partition paused
    await asyncio.wait_for(runner._room.wait(), 2)
    assert kafka.paused == set() and runner._due_wait == set()
