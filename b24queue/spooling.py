"""The ingress's sink when the spool is on: RabbitMQ first, the local spool when RabbitMQ cannot
take the event in time, and a forwarder that empties the spool into RabbitMQ once it can.

After a publish times out (broker down, or blocked by a memory/disk alarm) requests go straight
to the spool for `spool_bypass_s`, so callers are not each made to wait out the timeout; the
forwarder's next successful publish ends that early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from b24queue.envelope import Envelope, EventSink
from b24queue.errors import BrokerUnavailableError, PublishError
from b24queue.spool import Spool, SpoolFullError

log = logging.getLogger(__name__)

FORWARD_BATCH = 200


class SpoolingSink:
    def __init__(
        self, broker: EventSink, spool: Spool, *, bypass_s: float, retry_interval_s: float
    ) -> None:
        self._broker = broker
        self.spool = spool
        self._bypass_s = bypass_s
        self._retry_interval_s = retry_interval_s
        self._bypass_until = 0.0
        self._forwarder: asyncio.Task[None] | None = None
        self.spooled_total = 0
        self.forwarded_total = 0
        # Told how many events were just spooled and forwarded (the metrics count them).
        self.on_change: Callable[[int, int], None] | None = None

    async def __aenter__(self) -> SpoolingSink:
        self._forwarder = asyncio.create_task(self._forward_loop(), name="b24queue-forwarder")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._forwarder is not None:
            self._forwarder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._forwarder

    @property
    def depth(self) -> int:
        return self.spool.count

    def is_ready(self) -> bool:
        """Ready to accept an event: RabbitMQ is, or the spool has room."""
        return self._broker.is_ready() or self.spool.has_room()

    async def publish(self, envelope: Envelope) -> None:
        if self._broker.is_ready() and time.monotonic() >= self._bypass_until:
            try:
                await self._broker.publish(envelope)
                return
            except BrokerUnavailableError as exc:
                self._bypass_until = time.monotonic() + self._bypass_s
                log.warning("spooling: %s", exc)
            except PublishError as exc:
                if exc.returned:
                    raise  # unroutable even via the alternate exchange: a topology problem
                log.warning("spooling: %s", exc)
        try:
            await self.spool.put(envelope)
        except SpoolFullError as exc:
            raise BrokerUnavailableError(f"RabbitMQ cannot take the event and {exc}") from None
        self.spooled_total += 1
        if self.on_change is not None:
            self.on_change(1, 0)

    async def _forward_loop(self) -> None:
        while True:
            await self.spool.not_empty.wait()
            try:
                forwarded_all = await self._forward_batch()
            except Exception:  # a disk error must not end forwarding for good: retry later
                log.exception("forwarding spooled events failed; retrying")
                forwarded_all = False
            if not forwarded_all:
                await asyncio.sleep(self._retry_interval_s)

    async def _forward_batch(self) -> bool:
        """Publish the oldest spooled events, delete those confirmed. False: try again later."""
        if not self._broker.is_ready():
            return False
        batch = await self.spool.oldest(FORWARD_BATCH)
        if not batch:
            self.spool.not_empty.clear()
            return True
        results = await asyncio.gather(
            *(self._broker.publish(envelope) for _, envelope in batch),
            return_exceptions=True,
        )
        done = [row_id for (row_id, _), r in zip(batch, results, strict=True) if r is None]
        await self.spool.delete(done)
        self.forwarded_total += len(done)
        if done and self.on_change is not None:
            self.on_change(0, len(done))
        failures = [r for r in results if r is not None]
        if failures:
            log.warning(
                "forwarded %d spooled event(s); %d wait for RabbitMQ (%s)",
                len(done),
                len(failures),
                failures[0],
            )
            return False
        self._bypass_until = 0.0  # RabbitMQ takes events again
        if not self.spool.count:
            log.info("spool empty: every accepted event is in RabbitMQ")
        return True
