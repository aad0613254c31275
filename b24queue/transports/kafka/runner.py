"""One consumer queue in a worker process: a member of the queue's consumer group reading the
events topic and the queue's retry topics.

- At most `prefetch` records are with handlers at once, across all partitions; records read go
  to a lane per partition first (`lanes`, a full one pauses its fetch), and a free slot takes
  the head of a lane, the portals in turn (the fair share).
- The group's partitions are split by the range assignor (round robin while a member of an
  older version is in the group): the same partitions of the events topic and of each retry
  topic go to one member, so a portal's records are all in one process's lanes.
- An events record whose `to` does not name this queue is settled unread (`Binding.missed`).
- A retry record not due yet pauses its partition (seeked back to it) until it is due: every
  record of a retry topic waits the same delay, so the head of a partition is due first, and the
  events topic is never held up by it.
- Before a batch goes to handlers, the handout group commits where it ends; records under that
  point, read again by a later owner and not noted settled, are flagged redelivered and counted.
- Commits move over the settled prefix only (`offsets`); on a rebalance the partitions going
  away wait (bounded) for their handlers and commit; what is still open is delivered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.structs import ConsumerRecord

from b24queue.consumer import EventConsumer
from b24queue.delivery import Incoming, Outcome, give_up, process
from b24queue.settings import Settings
from b24queue.telemetry.metrics import WorkerMetrics
from b24queue.transports import connection_name
from b24queue.transports.kafka.client import (
    REVOKE_WAIT_S,
    Names,
    consumer,
    due_or_now,
    parse,
    targets,
)
from b24queue.transports.kafka.commits import Committer
from b24queue.transports.kafka.deliveries import DeliveryCounts
from b24queue.transports.kafka.lanes import READ_AHEAD, Lanes
from b24queue.transports.kafka.offsets import Offsets, Partition
from b24queue.transports.kafka.settle import OutcomeWriter
from b24queue.transports.kafka.topics import Binding, own_binding
from b24queue.transports.kit.inflight import HandlingRunner

log = logging.getLogger(__name__)


class KafkaRunner(HandlingRunner, ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self,
        consumer_: EventConsumer,
        settings: Settings,
        producer: AIOKafkaProducer,
        declare: Any,
        metrics: WorkerMetrics | None,
    ) -> None:
        super().__init__(consumer_, metrics, lambda _: self._after_handler())
        self._settings = settings
        self._names = Names.of(settings)
        self._declare = declare
        self._offsets = Offsets()
        self._outcomes = OutcomeWriter(producer, self.spec)
        self._counts = DeliveryCounts(settings, producer, self.spec.name)
        self._room = asyncio.Event()
        self._lanes = Lanes(self.spec.fairness)
        self._full: set[TopicPartition] = set()  # paused: their lane is full
        self._due_wait: set[TopicPartition] = set()  # paused: a retry record not due yet
        self._handing = False
        self._kafka: AIOKafkaConsumer | None = None
        self._commits: Committer | None = None
        self._own = Binding((), {})  # this queue's bindings record (none: never missed)
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        await self._declare(self.spec)
        self._own = await own_binding(self._settings, self._names, self.spec.name) or self._own
        await self.consumer.on_start()
        name = connection_name("worker", self.spec.name)
        group = Names.group(self.spec.name)
        self._kafka = consumer(
            self._settings,
            name,
            group,
            max_poll_records=READ_AHEAD,
            partition_assignment_strategy=(RangePartitionAssignor, RoundRobinPartitionAssignor),
        )
        handout = consumer(self._settings, name, Names.handout_group(self.spec.name))
        self._commits = Committer(self._kafka, handout, self._offsets, self._counts.note_settled)
        await self._commits.start()
        topics = [self._names.events, *(self.spec.retry_queue(d) for d in self.spec.retry_delays_s)]
        self._kafka.subscribe(sorted(set(topics)), listener=self)
        self._loop_task = asyncio.create_task(self._loop(), name=f"b24queue-kafka-{self.spec.name}")
        where, bound = self._settings.redacted_broker_url(), ",".join(self.spec.bindings)
        log.info("consuming %s from %s (bindings %s)", group, where, bound)

    # The group's callbacks -----------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Their handlers may finish first (fewer events handled twice); not while stopping:
        `drain` has waited already, and what it cancelled never settles. Their lanes go at once:
        what they held was never handed, and the next owner reads it again."""
        self._lanes.drop(revoked)
        self._full -= revoked
        self._due_wait -= revoked
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REVOKE_WAIT_S):
                while self._offsets.in_flight(revoked) and not self._stopping:
                    self._room.clear()
                    await self._room.wait()
        assert self._commits is not None
        await self._commits.commit(revoked)
        self._offsets.revoke(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Paused until set up: the fetcher must not hand out records of a partition before
        its state (and, for a new group, its starting offset) is in place."""
        assert self._kafka is not None and self._commits is not None
        if not assigned:
            return
        self._kafka.pause(*assigned)
        await self._commits.track(assigned)
        starts: dict[TopicPartition, tuple[int, int]] = {}
        for tp in assigned:
            committed = await self._kafka.committed(tp)
            handed = await self._commits.handed(tp)
            if committed is None:  # a new group: from where the queue was first bound
                events = tp.topic == self._names.events
                committed = self._own.since.get(tp.partition, 0) if events else 0
            starts[tp] = (committed, handed or 0)
        if any(handed > committed for committed, handed in starts.values()):
            await self._counts.load()  # the delivery counts and the settled marks
        for tp, (committed, handed) in starts.items():
            self._kafka.seek(tp, committed)
            self._offsets.assign(tp, committed, handed, self._counts.settled(tp))
        self._kafka.resume(*assigned)
        self._room.set()  # the loop may wait for a lane to drain: these have room

    # Reading -------------------------------------------------------------------------------

    async def _loop(self) -> None:
        """Read into the lanes while some partition's lane has room (a full one is paused),
        then hand records to the free slots (`_hand_out`, also run as each handler ends)."""
        assert self._kafka is not None
        while not self._stopping:
            try:
                batch = await self._kafka.getmany(timeout_ms=500, max_records=READ_AHEAD)
                self._read(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka away: the client reconnects; try again
                log.warning("worker of %s: %r; retrying", self.spec.name, exc)
                await asyncio.sleep(self._settings.reconnect_interval_s)
                continue
            self._hand_out()
            if self._kafka.paused() >= self._kafka.assignment() and self._lanes.waiting():
                self._room.clear()  # every partition paused: wait for a lane to drain
                await self._room.wait()

    def _read(self, batch: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        assert self._kafka is not None and self._commits is not None
        now_ms = time.time() * 1000
        for tp, records in batch.items():
            part = self._offsets.get(tp)
            if part is None:  # revoked since it was fetched
                continue
            if self._lanes.add(tp, self._choose(part, records, now_ms)):
                self._full.add(tp)
                self._kafka.pause(tp)
        self._commits.wake()

    def _hand_out(self) -> None:
        """Give the free slots their records, lane by lane in turn (`lanes`); resume the fetch
        of lanes with room again."""
        if self._stopping or self._kafka is None:
            return
        chosen: list[tuple[Partition, ConsumerRecord[Any, Any], int]] = []
        while len(self._tasks) + len(chosen) < self.consumer.prefetch:
            picked = self._lanes.next()
            if picked is None:
                break
            tp, record = picked
            part = self._offsets.get(tp)
            if part is None:  # revoked, its lane not dropped yet: read again by the next owner
                self._lanes.done(record)
                continue
            part.take(record.offset)
            redelivered = part.redelivered(record.offset)
            deliveries = self._counts.next(tp, record.offset) if redelivered else 1
            chosen.append((part, record, deliveries))
        for tp in [tp for tp in self._full if not self._lanes.full(tp)]:
            self._full.discard(tp)
            self._room.set()
            if tp not in self._due_wait and self._offsets.get(tp) is not None:
                self._kafka.resume(tp)
        if not chosen:
            return
        # Every handler of the batch waits for the mark (see the module's doc); the loop reads
        # on meanwhile.
        again = [(p.tp, r.offset, n) for p, r, n in chosen if n > 1]
        marked = asyncio.ensure_future(self._before_handlers(again))
        marked.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved here too
        for part, record, deliveries in chosen:
            task = self._tasks.start(
                self._handle(part, record, deliveries, marked), f"b24q-{self.spec.name}"
            )
            # Out of its portal's count however it ends (a task cancelled before it ran too).
            task.add_done_callback(functools.partial(self._handler_ended, record))
        if self._commits is not None:
            self._commits.wake()

    def _handler_ended(self, record: ConsumerRecord[Any, Any], _: object) -> None:
        self._lanes.done(record)

    def _after_handler(self) -> None:
        """A slot is free: hand it out once this turn of the event loop ends (handlers ending
        together go out in one batch, with one handout mark)."""
        self._room.set()
        if not self._handing:
            self._handing = True
            asyncio.get_running_loop().call_soon(self._hand_out_soon)

    def _hand_out_soon(self) -> None:
        self._handing = False
        self._hand_out()

    async def _before_handlers(self, again: list[tuple[TopicPartition, int, int]]) -> None:
        assert self._commits is not None
        await self._commits.mark()
        if again:
            await self._counts.record(again)

    def _choose(
        self, part: Partition, records: list[ConsumerRecord[Any, Any]], now_ms: float
    ) -> list[ConsumerRecord[Any, Any]]:
        """The records of one partition for its lane, in order (held); the others settled."""
        chosen = []
        for record in records:
            if record.offset < part.next:
                continue  # fetched before the partition's start was set: already seen
            if record.offset > part.next:  # gone (retention) before this group read it
                log.warning("%s: %s lost offsets up to %d", self.spec.name, part.tp, record.offset)
            if record.offset in part.prior:  # settled by an earlier owner
                part.pass_settled(record.offset)
                continue
            if part.tp.topic == self._names.events:
                if self.spec.name not in targets(record) and not self._own.missed(record):
                    part.skip(record.offset)
                    continue
            elif (due := due_or_now(record)) > now_ms:
                self._wait_until_due(part, record.offset, (due - now_ms) / 1000)
                break
            part.hold(record.offset)
            chosen.append(record)
        return chosen

    def _wait_until_due(self, part: Partition, offset: int, delay_s: float) -> None:
        assert self._kafka is not None
        self._kafka.pause(part.tp)
        self._kafka.seek(part.tp, offset)
        self._due_wait.add(part.tp)

        def resume() -> None:
            self._due_wait.discard(part.tp)
            if self._kafka is not None and self._offsets.owns(part) and part.tp not in self._full:
                self._kafka.resume(part.tp)
                self._room.set()  # the loop may wait with every partition paused: read it now

        asyncio.get_running_loop().call_later(delay_s, resume)

    async def _handle(
        self,
        part: Partition,
        record: ConsumerRecord[Any, Any],
        deliveries: int,
        marked: asyncio.Future[None],
    ) -> None:
        try:
            await asyncio.shield(marked)
        except Exception as exc:  # Kafka away: handled all the same; a later owner may not know
            log.warning("%s: handout not recorded (%r): may go unflagged", self.spec.name, exc)
        row, malformed = parse(record, deliveries, retry=part.tp.topic != self._names.events)
        incoming = Incoming(
            body=row.body,
            message_id=row.message_id,
            routing_key=row.routing_key,
            headers=row.headers,
            redelivered=part.redelivered(record.offset),
            accepted_at=row.timestamp,
            handle=(part, row, record.key or b""),  # retry copies keyed by portal too
        )
        if malformed is not None or deliveries > self.consumer.max_deliveries:
            await give_up(
                incoming,
                self.spec.name,
                self,
                deliveries,
                self._observe,
                malformed,
                consumer=self.consumer,
            )
        else:
            await process(self.consumer, incoming, self.spec.name, self, self._observe)

    async def settle(self, incoming: Incoming, outcome: Outcome) -> None:
        part, row, key = incoming.handle
        await self._outcomes.settle(row, key, outcome)
        part.settle(row.id)
        self._room.set()
        if self._commits is not None:
            self._commits.wake()

    # Stopping ------------------------------------------------------------------------------

    async def stop_consuming(self) -> None:
        self._stopping = True
        self._room.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None

    async def _drained(self) -> None:
        if self._commits is not None:
            await self._commits.commit(None)  # the settled prefix; the rest is delivered again

    async def _release(self) -> None:
        if self._commits is not None:
            await self._commits.stop()
        if self._kafka is not None:
            await self._kafka.stop()  # leaves the group: its partitions go to the others
