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

from aiokafka import AIOKafkaProducer
from aiokafka import errors as ke

from b24queue.errors import BrokerUnavailableError, PublishError
from b24queue.events.envelope import Envelope
from b24queue.settings import Settings
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
from b24queue.transports.kit.publisher import ReconnectingPublisher

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


class KafkaPublisher(ReconnectingPublisher):
    server = "Kafka"

    def __init__(self, settings: Settings, name: str) -> None:
        super().__init__(settings, name)
        self._names = Names.of(settings)
        self._producer: AIOKafkaProducer | None = None
        self._bindings = BindingsLog(settings, self._names)
        self._count_cap = CountCap(settings, self.unrouted)

    async def _close(self) -> None:
        await self._count_cap.close()
        await asyncio.gather(self._bindings.close(), return_exceptions=True)
        if self._producer is not None:
            await asyncio.gather(self._producer.stop(), return_exceptions=True)

    async def _connect(self) -> AIOKafkaProducer:
        client = admin(self._settings, self._name)
        await client.start()
        try:
            await ensure_topics(client, self._settings, base_topics(self._settings, self._names))
        finally:
            await client.close()
        return await started_producer(self._settings, self._name)

    async def _keep(self) -> None:
        """Connect (creating the base topics), then follow the bindings: a read that fails marks
        the publisher not ready, one that succeeds ready again."""
        self._producer = await self._until_up(self._connect)
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

    def is_ready(self) -> bool:
        return self._producer is not None and self._ready

    async def publish(self, envelope: Envelope) -> None:
        if not self.is_ready() or self._producer is None:
            raise BrokerUnavailableError("not connected to Kafka")
        queues = self._bindings.route(envelope.routing_key)
        topic = self._names.events if queues else self._names.unrouted
        routed = [(H_TO, ",".join(queues)), (H_BOUND, str(self._bindings.seen))]
        headers = record_headers(envelope, dict(envelope.headers), routed)
        sending = self._producer.send_and_wait(
            topic,
            envelope.body,
            key=key_of(envelope.headers),
            headers=headers,
            timestamp_ms=int(envelope.timestamp.timestamp() * 1000),
        )
        try:
            sent = await self._in_time(sending, "acknowledge")
        except ke.MessageSizeTooLargeError as exc:
            raise PublishError(f"Kafka refused the record: {exc}", permanent=True) from None
        except (ke.KafkaError, *UNAVAILABLE) as exc:
            self._lost()
            raise BrokerUnavailableError(f"Kafka did not take the event: {exc!r}") from None
        if not queues:
            self._count_cap.sent(sent.offset)
