"""The Kafka transport: the large tier (`B24QUEUE_BROKER_URL=kafka://host:9092[,host:9092...]`).

The guarantees every transport keeps (docs/transports/index.md), kept the Kafka way:
- a 200 means the broker acknowledged the record with `acks=all` (`publisher`);
- one events topic keyed by member_id; the ingress names the bound queues in each record's `to`
  header, or sends it to the unrouted topic (`topics`, `publisher`);
- a consumer group per queue, committing only the settled prefix of each partition (`runner`,
  `offsets`, `commits`), its handler slots given to the portals in turn (`lanes`); retries in
  one topic per delay, dead letters in `<queue>.dlq` (`settle`); `b24queue dlq` marks what it
  replays or purges (`dlq`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from b24queue.consumer import EventConsumer
from b24queue.queues import DeclaredQueue, QueueSpec, spec_for
from b24queue.settings import Settings
from b24queue.telemetry.metrics import WorkerMetrics
from b24queue.transports import Runner, connection_name, worker_connection_name
from b24queue.transports.kafka import topics
from b24queue.transports.kafka.client import Names, admin, consumer, translate
from b24queue.transports.kafka.dlq import TopicShelf
from b24queue.transports.kafka.publisher import KafkaPublisher, started_producer
from b24queue.transports.kafka.runner import KafkaRunner
from b24queue.transports.kit.tables import Depth, Overview, TableDeadLetters, table_status
from b24queue.transports.status import Status


async def _admin(settings: Settings, name: str) -> AIOKafkaAdminClient:
    client = admin(settings, name)
    try:
        await client.start()
    except Exception as exc:
        await asyncio.gather(client.close(), return_exceptions=True)
        raise translate(exc, settings) from None
    return client


class KafkaWorkers:
    def __init__(
        self, settings: Settings, client: AIOKafkaAdminClient, producer: AIOKafkaProducer
    ) -> None:
        self._settings = settings
        self._admin = client
        self._producer = producer
        self._lock = asyncio.Lock()

    async def _declare(self, spec: QueueSpec) -> list[str]:
        async with self._lock:
            return await topics.declare(self._settings, Names.of(self._settings), self._admin, spec)

    def runner(self, consumer_: EventConsumer, metrics: WorkerMetrics | None) -> KafkaRunner:
        return KafkaRunner(consumer_, self._settings, self._producer, self._declare, metrics)

    async def started(self, runners: Sequence[Runner]) -> None:
        return None

    async def close(self) -> None:
        await asyncio.gather(self._producer.stop(), self._admin.close(), return_exceptions=True)


class Kafka:
    name = "kafka"
    needs_spool = True
    shares_by_portal = True  # a lane per partition, the portals in turn (kafka.lanes)
    caps_per_portal = True  # a portal's partitions with one member (range assignor): kafka.lanes

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = Names.of(settings)

    def publisher(self, connection_name: str) -> KafkaPublisher:
        return KafkaPublisher(self.settings, connection_name)

    async def open_workers(self, classes: Sequence[type[EventConsumer]]) -> KafkaWorkers:
        name = worker_connection_name(classes)
        client = await _admin(self.settings, name)
        try:
            producer = await started_producer(self.settings, name)
        except Exception as exc:
            await client.close()
            raise translate(exc, self.settings) from None
        return KafkaWorkers(self.settings, client, producer)

    async def declare(self, classes: Sequence[type[EventConsumer]]) -> list[DeclaredQueue]:
        client = await _admin(self.settings, connection_name("topology"))
        try:
            await topics.ensure_topics(
                client, self.settings, topics.base_topics(self.settings, self.names)
            )
            for cls in classes:
                await topics.declare(self.settings, self.names, client, spec_for(cls))
        finally:
            await client.close()
        view = await self._overview()
        where = {"transport": "kafka", "events topic": self.names.events}
        states = [
            DeclaredQueue(
                self.settings.unrouted, view.queues[self.settings.unrouted].total, 0, where
            )
        ]
        for cls in classes:
            q = view.queues.get(cls.queue, Depth())
            states.append(DeclaredQueue(cls.queue, q.total, view.workers.get(cls.queue, 0), where))
            dlq = view.queues.get(cls.queue + ".dlq", Depth())
            states.append(DeclaredQueue(cls.queue + ".dlq", dlq.total, 0, where))
        return states

    async def status(self) -> Status:
        return table_status(self.settings, await self._overview(), "kafka")

    async def _overview(self) -> Overview:
        """Per queue: READY the records of the events topic its group has not looked at yet
        (its lag: other queues' records among them), RETRYING its retry topics' lag, the
        consumers its group's members; the dead-letter topics counted as `dlq list` does."""
        client = await _admin(self.settings, connection_name("status"))
        log = topics.BindingsLog(self.settings, self.names)
        reader = consumer(self.settings, connection_name("status"), None)
        shelf = TopicShelf(self.settings)
        try:
            await reader.start()
            await shelf.open()
            bound = await log.load()
            queues: dict[str, Depth] = {}
            workers: dict[str, int] = {}
            for name in sorted(bound):
                spec = QueueSpec(name, bound[name].bindings, ())
                retry = [t for t in await reader.topics() if t.startswith(name + ".retry.")]
                ready = await _lag(self.settings, name, self.names.events, bound[name].since)
                later = sum([await _lag(self.settings, name, t, {}) for t in retry])
                queues[name] = Depth(ready, 0, later)
                queues[spec.dlq] = Depth(await shelf.count(spec.dlq))
                workers[name] = await _members(client, name)
            queues[self.settings.unrouted] = Depth(await shelf.count(self.settings.unrouted))
        except Exception as exc:
            raise translate(exc, self.settings) from None
        finally:
            await asyncio.gather(
                log.close(), reader.stop(), client.close(), shelf.close(), return_exceptions=True
            )
        return Overview(sorted(bound), queues, workers, [])

    def dead_letters(self, queue: str) -> TableDeadLetters:
        held: list[TopicShelf] = []

        async def open_shelf() -> TopicShelf:
            try:
                held.append(await TopicShelf(self.settings).open())
            except Exception as exc:
                raise translate(exc, self.settings) from None
            return held[0]

        async def close_shelf() -> None:
            while held:
                await asyncio.gather(held.pop().close(), return_exceptions=True)

        return TableDeadLetters(self.settings, queue, open_shelf, close_shelf)


async def _lag(settings: Settings, group: str, topic: str, since: dict[int, int]) -> int:
    reader = consumer(settings, connection_name("status"), group)
    await reader.start()
    try:
        await reader.topics()
        tps = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
        ends = await reader.end_offsets(tps) if tps else {}
        total = 0
        for tp, end in ends.items():
            committed = await reader.committed(tp)
            start = committed if committed is not None else since.get(tp.partition, 0)
            total += max(0, end - start)
        return total
    finally:
        await reader.stop()


async def _members(client: AIOKafkaAdminClient, group: str) -> int:
    described = await client.describe_consumer_groups([group])
    return sum(len(g[5]) for response in described for g in response.groups if g[2] == "Stable")


def transport(settings: Settings) -> Kafka:
    return Kafka(settings)
