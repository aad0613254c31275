"""Offset commits of one runner: the group's (the settled prefix of each partition, batched:
whatever settles while a commit is out goes in the next) and the handout group's (where the
records handed to handlers end, committed before they run), and with each commit the settled
marks: the records settled above a commit point (see `deliveries`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from b24queue.transports.kafka.offsets import Offsets

log = logging.getLogger(__name__)

COMMIT_EVERY_S = 0.05  # at most this often, so a busy queue commits in batches


Note = Callable[[dict[TopicPartition, frozenset[int]]], Awaitable[None]]


class Committer:
    def __init__(
        self, kafka: AIOKafkaConsumer, handout: AIOKafkaConsumer, offsets: Offsets, note: Note
    ) -> None:
        self._note = note
        self._kafka = kafka
        self._handout = handout
        self._offsets = offsets
        self._lock = asyncio.Lock()
        self._marking = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tracked: set[TopicPartition] = set()

    async def start(self) -> None:
        await self._handout.start()
        await self._kafka.start()
        self._task = asyncio.create_task(self._loop(), name="b24queue-kafka-commits")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._handout.stop()

    def wake(self) -> None:
        self._wake.set()

    async def handed(self, tp: TopicPartition) -> int | None:
        offset: int | None = await self._handout.committed(tp)
        return offset

    async def track(self, tps: Iterable[TopicPartition]) -> None:
        """The handout group commits only for partitions assigned to it: assigned, never read."""
        new = set(tps) - self._tracked
        if new:
            self._tracked |= new
            self._handout.assign(sorted(self._tracked))
            self._handout.pause(*self._tracked)

    async def mark(self) -> None:
        """One at a time: a later mark never goes out before an earlier (lower) one."""
        async with self._marking:
            points = self._offsets.to_mark()
            if points:
                await self._handout.commit(points)
                self._offsets.marked(points)

    async def commit(self, tps: Iterable[TopicPartition] | None) -> None:
        """Commit the settled prefixes (of `tps`, or all), then note what is settled above them;
        a failure is logged, tried later."""
        tps = None if tps is None else list(tps)  # read twice
        async with self._lock:
            await self._commit(tps)
            marks = self._offsets.to_note(tps)
            if not marks:
                return
            try:
                await self._note({p.tp: done for p, done in marks.items()})
            except Exception as exc:  # Kafka away: a later owner may hand them out again
                log.info("settled marks of %d partition(s) not written (%r)", len(marks), exc)
                self._wake.set()
                return
            for part, done in marks.items():
                part.noted = done

    async def _commit(self, tps: Iterable[TopicPartition] | None) -> None:
        points = self._offsets.to_commit(tps)
        if not points:
            return
        try:
            await self._kafka.commit(points)
        except Exception as exc:  # a rebalance under way, Kafka away: next time
            log.info("commit of %d partition(s) failed (%r); tried again", len(points), exc)
            self._wake.set()
            return
        self._offsets.committed(points)

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.commit(None)
            await asyncio.sleep(COMMIT_EVERY_S)
