"""The Kafka transport's topology: topics created idempotently, and the bindings topic.

  <exchange>                 the events, keyed by member_id; header `to` = the queues routed to
  <exchange>.bindings        one record per change of a queue's bindings (1 partition, compacted)
  <unrouted>                 events no queue was bound to (1 partition, capped in bytes)
  <queue>.retry.<d>          one per retry delay: copies waiting until their `due` time
  <queue>.dlq                dead letters, and the markers of those replayed or purged
  <queue>.deliveries         counts of records handed out again (`deliveries`)

The bindings topic is read whole (it holds a record per deploy of a consumer, not per event);
the latest record of a queue has its bindings and its `since` (each record repeats the first's,
so compaction, which keeps only the latest per queue, loses nothing): the end offsets of the
events topic before the queue was first bound, where its group starts (no event published
earlier can name it in `to`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import errors as ke
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from b24queue.errors import TopologyMismatchError
from b24queue.layout import QueueSpec, topic_matches
from b24queue.settings import Settings
from b24queue.transports.kafka.client import H_BOUND, Names, check_topic, consumer, header
from b24queue.transports.kafka.configs import COMPACT, KEEP, capped, check_configs

log = logging.getLogger(__name__)


class Topic(NamedTuple):
    partitions: int
    configs: Mapping[str, str] = {}  # required: another value is a mismatch
    initial: Mapping[str, str] = {}  # created with; an existing topic keeps its own

    @property
    def created_with(self) -> dict[str, str]:
        return {**self.initial, **self.configs}


@dataclass(slots=True)
class Binding:
    bindings: tuple[str, ...]
    since: dict[int, int]
    offset: int = 0  # of the queue's latest record in the bindings topic

    def missed(self, record: ConsumerRecord[Any, Any]) -> bool:
        """An events-topic record whose `to` does not name this queue, routed by an ingress
        that had not read this binding yet (its `b` header: the offset after the last bindings
        record it had read), that this binding matches: it is this queue's too."""
        stamp = header(record, H_BOUND)
        if stamp is None or not stamp.isdigit() or int(stamp) > self.offset:
            return False
        key = header(record, "k") or ""
        return any(topic_matches(p, key) for p in self.bindings)


@dataclass(slots=True)
class BindingsLog:
    """The bindings topic as read so far; `load` reads what was added since."""

    settings: Settings
    names: Names
    queues: dict[str, Binding] = field(default_factory=dict)
    seen: int = 0  # the offset after the last record read: stamped on what `route` routes
    _reader: AIOKafkaConsumer | None = None

    async def load(self) -> dict[str, Binding]:
        tp = TopicPartition(self.names.bindings, 0)
        if self._reader is None:
            self._reader = consumer(self.settings, "b24queue bindings", None)
            await self._reader.start()
            self._reader.assign([tp])
            await self._reader.seek_to_beginning(tp)
        end = (await self._reader.end_offsets([tp]))[tp]
        while await self._reader.position(tp) < end:
            for record in (await self._reader.getmany(tp, timeout_ms=1000)).get(tp, []):
                value = json.loads(record.value or b"{}")
                key = (record.key or b"").decode()
                first = self.queues.get(key)
                since = first.since if first else {int(k): v for k, v in value["since"].items()}
                self.queues[key] = Binding(tuple(value["bindings"]), since, record.offset)
                self.seen = record.offset + 1
        return self.queues

    def route(self, routing_key: str) -> list[str]:
        return sorted(
            q
            for q, b in self.queues.items()
            if any(topic_matches(p, routing_key) for p in b.bindings)
        )

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None


async def ensure_topics(
    admin: AIOKafkaAdminClient, settings: Settings, wanted: dict[str, Topic]
) -> None:
    """Create what is missing, with its settings (`configs`); an existing topic with other
    partitions or settings is an error."""
    for name in wanted:
        check_topic(name)
    existing = set(await admin.list_topics())
    missing = [n for n in wanted if n not in existing]
    if missing:
        rf = settings.kafka_replication_factor
        new = [
            NewTopic(n, wanted[n].partitions, rf, topic_configs=wanted[n].created_with)
            for n in missing
        ]
        try:
            response = await admin.create_topics(new)
        except ke.TopicAlreadyExistsError:  # created by another worker meanwhile
            response = None
        for name, code, *_ in getattr(response, "topic_errors", ()):
            if code not in (0, ke.TopicAlreadyExistsError.errno):
                raise TopologyMismatchError(
                    f"Kafka refused to create topic {name!r}: {ke.for_code(code).__name__}"
                )
    present = [n for n in wanted if n in existing]
    if present:
        for described in await admin.describe_topics(present):
            partitions = len(described["partitions"])
            name = described["topic"]
            if partitions != wanted[name].partitions:
                raise TopologyMismatchError(
                    f"topic {name!r} has {partitions} partition(s), b24queue declares "
                    f"{wanted[name].partitions} (B24QUEUE_KAFKA_PARTITIONS); change one to match"
                )
        await check_configs(
            admin,
            {n: wanted[n].configs for n in present},
            {n: wanted[n].initial for n in present},
        )


def queue_topics(settings: Settings, spec: QueueSpec) -> dict[str, Topic]:
    p = settings.kafka_partitions
    topics = {spec.retry_queue(d): Topic(p) for d in sorted(set(spec.retry_delays_s))}
    topics[spec.dlq] = Topic(1, KEEP)
    topics[f"{spec.name}.deliveries"] = Topic(1, COMPACT)  # deliveries.deliveries_topic
    return topics


def base_topics(settings: Settings, names: Names) -> dict[str, Topic]:
    """The events topic keeps the broker's retention: it bounds how long a queue's workers may
    be down (records and committed offsets expire); the others hold state (`configs`)."""
    return {
        names.events: Topic(settings.kafka_partitions),
        names.bindings: Topic(1, COMPACT),
        names.unrouted: Topic(1, KEEP, capped(settings)),
    }


async def declare(
    settings: Settings, names: Names, admin: AIOKafkaAdminClient, spec: QueueSpec
) -> list[str]:
    """The queue's topics and exactly its bindings; the bindings removed."""
    check_topic(spec.name)
    await ensure_topics(
        admin, settings, base_topics(settings, names) | queue_topics(settings, spec)
    )
    log_ = BindingsLog(settings, names)
    try:
        current = (await log_.load()).get(spec.name)
    finally:
        await log_.close()
    if current is not None and current.bindings == spec.bindings:
        return []
    since = current.since if current is not None else await end_offsets(settings, names.events)
    value = json.dumps({"bindings": list(spec.bindings), "since": since}).encode()
    writer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await writer.start()
    try:
        await writer.send_and_wait(names.bindings, value, key=spec.name.encode())
    finally:
        await writer.stop()
    return sorted(set(current.bindings) - set(spec.bindings)) if current else []


async def own_binding(settings: Settings, names: Names, queue: str) -> Binding | None:
    """The queue's latest bindings record: its `since`, where a new group of the queue starts
    on the events topic, per partition, and its offset (`Binding.missed`)."""
    bindings = BindingsLog(settings, names)
    try:
        return (await bindings.load()).get(queue)
    finally:
        await bindings.close()


async def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    reader = consumer(settings, "b24queue offsets", None)
    await reader.start()
    try:
        await reader.topics()  # the cluster's metadata, this topic's partitions among it
        parts = reader.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        ends = await reader.end_offsets(tps) if tps else {}
    finally:
        await reader.stop()
    return {tp.partition: offset for tp, offset in ends.items()}
