"""The ingress's sink on Kafka: `publish` returns once the broker acknowledged the record with
`acks=all` (an idempotent producer where the broker supports one). The ingress routes: the
record goes to the events topic naming the queues bound to its event in its `to` header, or to
the unrouted topic when none is; the bindings are the bindings topic's, followed as it grows.

While Kafka is unreachable `publish` raises `BrokerUnavailableError` (the ingress spools). A send
given up after `publish_timeout_s` may still reach Kafka later (a duplicate of the spooled copy:
at least once, never lost)."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from aiokafka import AIOKafkaProducer
from aiokafka import errors as ke

from b24queue.envelope import Envelope
from b24queue.errors import B24QueueError, BrokerUnavailableError, PublishError
from b24queue.settings import Settings
from b24queue.transports import given_up
from b24queue.transports.kafka.client import (
    H_BOUND,
    H_TO,
    UNAVAILABLE,
    Names,
    admin,
    key_of,
    producer,
    record_headers,
)
from b24queue.transports.kafka.topics import BindingsLog, base_topics, ensure_topics
from b24queue.transports.kafka.unrouted import CountCap
from b24queue.transports.unrouted import UnroutedCap

log = logging.getLogger(__name__)

BINDINGS_EVERY_S = 0.5  # how stale the ingress's view of the bindings may be


async def started_producer(settings: Settings, name: str) -> AIOKafkaProducer:
    """Idempotent when the broker can (Tansu 0.6 cannot: InitProducerId fails), else plain."""
    for idempotent in (True, False):
        kafka = producer(settings, name, idempotent=idempotent)
        try:
            await kafka.start()
        except UNAVAILABLE:
            await kafka.stop()
            raise
        except ke.KafkaError as exc:
            await kafka.stop()
            if not idempotent:
                raise
            log.warning("Kafka gives no idempotent producer (%r): acks=all without it", exc)
            continue
        return kafka
    raise AssertionError("unreachable")


class KafkaPublisher:
    def __init__(self, settings: Settings, name: str) -> None:
        self._settings = settings
        self._name = name
        self._names = Names.of(settings)
        self._producer: AIOKafkaProducer | None = None
        self._bindings = BindingsLog(settings, self._names)
        self._ready = False
        self._task: asyncio.Task[None] | None = None
        self.breaks = 0
        self.unrouted = UnroutedCap(settings)
        self._count_cap = CountCap(settings, self.unrouted)

    async def __aenter__(self) -> KafkaPublisher:
        self._task = asyncio.create_task(self._keep(), name="b24queue-kafka-publisher")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._count_cap.close()
        await asyncio.gather(self._bindings.close(), return_exceptions=True)
        if self._producer is not None:
            await asyncio.gather(self._producer.stop(), return_exceptions=True)

    async def _connect(self) -> None:
        client = admin(self._settings, self._name)
        await client.start()
        try:
            await ensure_topics(client, self._settings, base_topics(self._settings, self._names))
        finally:
            await client.close()
        self._producer = await started_producer(self._settings, self._name)

    async def _keep(self) -> None:
        """Connect (creating the base topics), then follow the bindings: a read that fails marks
        the publisher not ready, one that succeeds ready again."""
        while self._producer is None:
            try:
                await self._connect()
            except B24QueueError:
                raise
            except Exception as exc:
                log.warning("Kafka not ready (%r); retrying", exc)
                await asyncio.sleep(self._settings.reconnect_interval_s)
        log.info("publishing to %s", self._settings.redacted_broker_url())
        while True:
            try:
                await self._bindings.load()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._ready:
                    log.warning("Kafka away (%r)", exc)
                self._ready = False
            else:
                if not self._ready:
                    log.info("Kafka answers; bindings of %d queue(s)", len(self._bindings.queues))
                self._ready = True
            await asyncio.sleep(BINDINGS_EVERY_S)

    async def failed(self) -> BaseException:
        return await given_up(self._task)

    def is_ready(self) -> bool:
        return self._producer is not None and self._ready

    async def publish(self, envelope: Envelope) -> None:
        if not self.is_ready() or self._producer is None:
            raise BrokerUnavailableError("not connected to Kafka")
        queues = self._bindings.route(envelope.routing_key)
        topic = self._names.events if queues else self._names.unrouted
        routed = [(H_TO, ",".join(queues)), (H_BOUND, str(self._bindings.seen))]
        headers = record_headers(envelope, dict(envelope.headers), routed)
        timeout_s = self._settings.publish_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                sent = await self._producer.send_and_wait(
                    topic,
                    envelope.body,
                    key=key_of(envelope.headers),
                    headers=headers,
                    timestamp_ms=int(envelope.timestamp.timestamp() * 1000),
                )
        except TimeoutError:
            raise BrokerUnavailableError(
                f"Kafka did not acknowledge within {timeout_s:g}s"
            ) from None
        except ke.MessageSizeTooLargeError as exc:
            raise PublishError(f"Kafka refused the record: {exc}", permanent=True) from None
        except (ke.KafkaError, *UNAVAILABLE) as exc:
            if self._ready:
                self.breaks += 1
            self._ready = False
            raise BrokerUnavailableError(f"Kafka did not take the event: {exc!r}") from None
        if not queues:
            self._count_cap.sent(sent.offset)
