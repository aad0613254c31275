"""The ingress's sink when the spool is on: the queue's server first (RabbitMQ, PostgreSQL), the
local spool when it cannot take the event in time, and a forwarder that empties the spool into it
once it can.

After a publish times out (broker down, or blocked by a memory/disk alarm) requests go straight
to the spool for `spool_bypass_s`, so callers are not each made to wait out the timeout; the
forwarder's next successful publish ends that early.

An event the broker refuses for itself (`PublishError.permanent`) is never spooled: the caller
hears at once. A spooled event that fails for a reason of its own is moved aside (`quarantine`)
rather than block the line: at once when the broker refuses it for itself; and when a batch
broke the channel or connection, the forwarder sends the oldest event alone next, and moves it
aside once it has broken them alone `MAX_STRIKES` times (a blocked or stopped broker breaks
nothing: it does not count). A channel closed for one message fails every publish in flight on it,
so only an event that fails alone is ever set aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from b24queue.errors import BrokerUnavailableError, PublishError, SpoolFullError
from b24queue.events.envelope import Envelope, EventSink
from b24queue.ingress.spool import Spool

log = logging.getLogger(__name__)

FORWARD_BATCH = 200
MAX_STRIKES = 3


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
        self.quarantined_total = 0
        # Told how many events were just spooled and forwarded (the metrics count them).
        self.on_change: Callable[[int, int], None] | None = None
        # After a batch broke the channel or connection, send the oldest event alone: the cause?
        self._isolate = False
        self._strikes: dict[int, int] = {}

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

    @property
    def quarantined(self) -> int:
        return self.spool.quarantined

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
                if exc.returned or exc.permanent:
                    # Unroutable even via the alternate exchange (a topology problem), or
                    # refused for itself: spooled, it would fail the same way.
                    raise
                log.warning("spooling: %s", exc)
        try:
            await self.spool.put(envelope)
        except SpoolFullError as exc:
            raise BrokerUnavailableError(f"the queue cannot take the event and {exc}") from None
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
        batch = await self.spool.oldest(1 if self._isolate else FORWARD_BATCH)
        if not batch:
            self.spool.not_empty.clear()
            return True
        losses = self._losses()
        results = await asyncio.gather(
            *(self._broker.publish(envelope) for _, envelope in batch),
            return_exceptions=True,
        )
        broke = self._losses() > losses
        outcomes = [(row_id, r) for (row_id, _), r in zip(batch, results, strict=True)]
        done = [row_id for row_id, r in outcomes if r is None]
        await self.spool.delete(done)
        for row_id in done:
            self._strikes.pop(row_id, None)
        self.forwarded_total += len(done)
        if done and self.on_change is not None:
            self.on_change(0, len(done))
        failed = [(row_id, r) for row_id, r in outcomes if r is not None]
        for row_id, error in failed:
            await self._judge(row_id, error, alone=len(batch) == 1, broke=broke)
        self._isolate = broke and bool(failed)
        if failed:
            log.warning(
                "forwarded %d spooled event(s); %d wait for the queue (%s)",
                len(done),
                len(failed),
                failed[0][1],
            )
            return False
        self._bypass_until = 0.0  # RabbitMQ takes events again
        if not self.spool.count:
            log.info("spool empty: every accepted event is in the queue")
        return True

    def _losses(self) -> int:
        return int(getattr(self._broker, "breaks", 0))

    async def _judge(self, row_id: int, error: BaseException, *, alone: bool, broke: bool) -> None:
        """Move a spooled event aside if it is the reason it fails."""
        if isinstance(error, PublishError) and error.permanent:
            await self._set_aside(row_id, str(error))
        elif alone and broke:
            strikes = self._strikes[row_id] = self._strikes.get(row_id, 0) + 1
            if strikes >= MAX_STRIKES:
                await self._set_aside(
                    row_id,
                    f"publishing it alone broke the channel or connection {strikes} times: {error}",
                )

    async def _set_aside(self, row_id: int, reason: str) -> None:
        self._strikes.pop(row_id, None)
        await self.spool.quarantine(row_id, reason)
        self.quarantined_total += 1
        log.error(
            "spooled event (row %d) moved to quarantine in %s: %s; see `b24queue spool list`",
            row_id,
            self.spool.path,
            reason,
        )
        if self.on_change is not None:
            self.on_change(0, 0)
