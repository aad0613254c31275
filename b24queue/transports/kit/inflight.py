"""A runner's handlers in flight: one task per delivery, counted, and drained when the worker
stops (the same rule on every transport); and the runner's skeleton every transport shares."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from b24queue.consumer import EventConsumer
from b24queue.queues import spec_for
from b24queue.telemetry.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class InFlight:
    """The tasks handling a runner's deliveries. `on_done` runs as each one ends (before the set
    may turn idle): a runner makes room for the next claim there."""

    def __init__(self, on_done: Callable[[asyncio.Task[Any]], None] | None = None) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_done = on_done
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, handler: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(handler, name=name)
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if self._on_done is not None:
            self._on_done(task)
        if not self._tasks:
            self._idle.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task crashed", exc_info=task.exception())

    async def drain(self, timeout_s: float) -> int:
        """Wait for the handlers; cancel what is still running after `timeout_s` (their
        deliveries are not settled: the transport delivers them again). Returns how many were
        cancelled."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        left = list(self._tasks)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        return len(left)


class HandlingRunner:
    """What every transport's runner shares: its consumer and queue, the handlers in flight
    (the worker's in-flight gauge reads their count), and the end of a run: `drain` waits for
    them, then `_drained` (hand back or commit what is settled); `close` calls the consumer's
    `on_stop`, then `_release` (whatever happens in `on_stop`)."""

    def __init__(
        self,
        consumer: EventConsumer,
        metrics: WorkerMetrics | None,
        on_done: Callable[[asyncio.Task[Any]], None] | None = None,
    ) -> None:
        self.consumer = consumer
        self.spec = spec_for(type(consumer))
        self._observe = metrics.observe if metrics is not None else None
        self._tasks = InFlight(on_done)
        if metrics is not None:
            metrics.count_in_flight(consumer.queue, lambda: len(self._tasks))

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout_s: float) -> int:
        """Wait for in-flight handlers; cancel what is still running after `timeout_s` (their
        deliveries are not settled: delivered again). Returns how many were cancelled."""
        left = await self._tasks.drain(timeout_s)
        await self._drained()
        return left

    async def _drained(self) -> None:
        """After the handlers: what the transport does with what they left."""

    async def close(self) -> None:
        try:
            await self.consumer.on_stop()
        finally:
            await self._release()

    async def _release(self) -> None:
        """What the runner holds (a channel, a consumer group, its leases)."""
