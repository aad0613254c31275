"""The unrouted topic's cap in events (`B24QUEUE_UNROUTED_MAX_EVENTS`). Kafka keeps no count, so
the publisher that sends to the topic deletes the records before its newest `max_events`
(DeleteRecords: the topic's start moves on), once every `max_events / 64` records it sent there,
in the background. Its cap in bytes is the topic's own `retention.bytes` (`configs.capped`).

A broker without DeleteRecords (Tansu 0.6) is said once in the log; the bytes cap still holds
where the broker enforces `retention.bytes`.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import TopicPartition
from aiokafka.admin import RecordsToDelete

from b24queue.settings import Settings
from b24queue.transports.kafka.client import admin, consumer
from b24queue.transports.unrouted import UnroutedCap

log = logging.getLogger(__name__)


class CountCap:
    def __init__(self, settings: Settings, cap: UnroutedCap) -> None:
        self._settings = settings
        self._cap = cap
        self._tp = TopicPartition(settings.unrouted, 0)
        self._every = max(1, cap.max_events // 64)
        self._deleted_to = 0  # the topic's start as this process last moved it
        self._task: asyncio.Task[None] | None = None
        self._failed = False

    def sent(self, offset: int) -> None:
        """A record went to the unrouted topic at `offset`: delete what is past the cap, if it
        is time to."""
        before = offset + 1 - self._cap.max_events
        if self._task is not None or before < self._deleted_to + self._every:
            return
        self._task = asyncio.create_task(self._delete(before), name="b24queue-unrouted-cap")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _delete(self, before: int) -> None:
        client = admin(self._settings, "b24queue unrouted cap")
        reader = consumer(self._settings, "b24queue unrouted cap", None)
        try:
            await client.start()
            await reader.start()
            start = (await reader.beginning_offsets([self._tp]))[self._tp]
            if before > start:
                done = await client.delete_records({self._tp: RecordsToDelete(before)})
                start, dropped = done[self._tp], done[self._tp] - start
                self._cap.dropped(dropped, None)
            self._deleted_to, self._failed = start, False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # tried again `_every` records later; said once in a row
            self._deleted_to = before
            log.log(
                logging.DEBUG if self._failed else logging.WARNING,
                "Kafka did not delete the oldest records of the unrouted topic %r (%r): its cap "
                "in events (B24QUEUE_UNROUTED_MAX_EVENTS) is not enforced meanwhile; its cap in "
                "bytes is the topic's retention.bytes",
                self._tp.topic,
                exc,
            )
            self._failed = True
        finally:
            await asyncio.gather(reader.stop(), client.close(), return_exceptions=True)
            self._task = None
