"""Carrying out an outcome on Kafka: an ack changes nothing here (the offset is committed once
every earlier record is settled too); a retry or a dead letter is a copy sent to the retry topic
of its delay or to `<queue>.dlq`, acknowledged (`acks=all`) before the original counts as
settled. A copy that cannot be sent for now (Kafka away, a leader moving) is tried again until
it is: the original stays open, so it holds its partition's commit point (it is delivered again
if the worker stops meanwhile). One Kafka refuses for itself (too large for the producer's
`max_request_size` or the topic's `max.message.bytes`, a topic it may not write, a record a
compacted topic cannot take) would fail the same way for ever: that raises a permanent
`PublishError` naming the topic, logged; the original stays open (held, delivered again after a
restart, and dead-lettered as `delivery_limit` when it can be) instead of a loop."""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaProducer
from aiokafka import errors as ke

from b24queue.delivery import Outcome
from b24queue.errors import PublishError
from b24queue.queues import QueueSpec
from b24queue.retry import snap_delay
from b24queue.transports.kafka.client import H_DUE, record_headers
from b24queue.transports.kit.leased import Row

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 5.0
# Refused for the record itself: sending it again fails the same way.
PERMANENT: tuple[type[BaseException], ...] = (
    ke.MessageSizeTooLargeError,
    ke.RecordTooLargeError,
    ke.RecordListTooLargeError,
    ke.InvalidTopicError,
    ke.TopicAuthorizationFailedError,
    ke.CorruptRecordException,
    ke.PolicyViolationError,
    ke.UnsupportedForMessageFormatError,
)


class OutcomeWriter:
    """A Kafka runner's outcomes, carried out (the module says how)."""

    def __init__(self, producer: AIOKafkaProducer, spec: QueueSpec) -> None:
        self._producer = producer
        self._spec = spec

    async def settle(self, row: Row, key: bytes | None, outcome: Outcome) -> None:
        if outcome.kind == "ack":
            return
        extra: list[tuple[str, str]] = []
        if outcome.kind == "retry":
            delay_s = snap_delay(outcome.delay_s or 0.0, self._spec.retry_delays_s)
            topic = self._spec.retry_queue(delay_s)
            extra.append((H_DUE, str(int((time.time() + delay_s) * 1000))))
        else:
            topic = self._spec.dlq
        headers = record_headers(row, outcome.headers, extra)
        await self._send(topic, row.body, key, headers)

    async def _send(
        self, topic: str, body: bytes, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        backoff_s = 0.2
        while True:
            try:
                await self._producer.send_and_wait(topic, body, key=key, headers=headers)
                return
            except PERMANENT as exc:
                log.error("Kafka refuses the copy for %s (%r): the original stays open", topic, exc)
                raise PublishError(
                    f"Kafka refuses a copy for {topic!r} ({len(body)} bytes): {exc!r}",
                    permanent=True,
                ) from None
            except Exception as exc:  # Kafka away, a leader moving: the copy must get there
                log.warning("sending to %s failed (%r); trying again", topic, exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
