"""The worker side of a queue kept in database rows (SQLite, PostgreSQL): a runner per consumer
claims up to `prefetch` rows under a lease, handles each in a task of its own, settles it in one
transaction fenced by the delivery count, and renews its leases at every heartbeat. A transport
supplies the `Leases` (its SQL); the rules here are the same on every database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from b24queue import _constants as c
from b24queue.consumer import EventConsumer
from b24queue.delivery import Incoming, Outcome, attempt_of, give_up, process
from b24queue.events.envelope import Envelope
from b24queue.queues import QueueSpec
from b24queue.telemetry.metrics import WorkerMetrics
from b24queue.transports.kit.inflight import HandlingRunner

if TYPE_CHECKING:
    from b24queue.transports import Runner

log = logging.getLogger(__name__)

# Without handle_timeout_s a handler may run for ever; its lease must end some time.
DEFAULT_LEASE_S = 30 * 60
LEASE_MARGIN_S = 5.0  # the settle after a handler is cut by its timeout
HEARTBEAT_S = 5.0
SETTLE_ATTEMPTS = 5
ALIVE_S = 3 * HEARTBEAT_S
STOP_WAIT_S = 15.0  # a claim or heartbeat in progress as a worker stops


@dataclass(frozen=True, slots=True)
class Row:
    """One message row, as claimed. `fence` counts every claim of the row and is never reset: a
    settlement applies only while the row still holds this claim. `deliveries` counts the claims
    since the row was last settled (a retry resets it): more than one means redelivered."""

    id: Any  # the database's: a row number, a stream entry id
    message_id: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]
    timestamp: datetime
    event_type: str
    deliveries: int
    fence: int
    # Coalescing (`EventConsumer.coalesce`): the earlier rows of its group leased with it, oldest
    # first; settled with it (handled, retried or dead-lettered together).
    replaced: tuple[Row, ...] = ()

    def envelope(self, headers: dict[str, Any]) -> Envelope:
        """The event again, with these headers (a replay out of a DLQ or the unrouted queue)."""
        return Envelope(
            message_id=self.message_id,
            routing_key=self.routing_key,
            body=self.body,
            headers={k: str(v) for k, v in headers.items()},
            timestamp=self.timestamp,
            event_type=self.event_type,
        )


def coalesced(group: Sequence[Row]) -> Row:
    """A group's rows leased together (`EventConsumer.coalesce`; oldest first) as the one
    delivery handed over: the latest, the others its `replaced`. It carries the group's highest
    attempt and deliveries: a newer event joining a key that is being retried does not start its
    attempts again (`max_attempts`, `max_deliveries` and the retry delays hold)."""
    latest, earlier = group[-1], tuple(group[:-1])
    if not earlier:
        return latest
    attempt = max(attempt_of(r.headers) for r in group)
    headers = latest.headers
    if attempt > attempt_of(headers):
        headers = {**headers, c.H_ATTEMPT: attempt}
    deliveries = max(r.deliveries for r in group)
    return replace(latest, headers=headers, deliveries=deliveries, replaced=earlier)


class Leases(Protocol):
    """A database's queue operations for runners; each call is one committed transaction (or
    part of a group-committed one) and raises on a database failure."""

    where: str  # for the log: which database
    poll_s: float  # an idle runner looks again after this, woken or not

    async def declare(self, spec: QueueSpec) -> list[str]:
        """The queue, its DLQ and exactly its bindings; the bindings removed."""

    def wake(self, queue: str) -> asyncio.Event:
        """Set when events for `queue` may have arrived."""

    async def claim(self, spec: QueueSpec, owner: str, count: int, lease_s: float) -> list[Row]:
        """Lease up to `count` due rows of `spec.name`; in turns among the portals where
        `spec.fairness` asks it and the database keeps it (b24queue.transports.kit.fair)."""

    async def ack(self, row: Row, owner: str, queue: str) -> bool: ...

    async def move(
        self, row: Row, owner: str, *, queue: str, headers: dict[str, Any], delay_s: float
    ) -> bool:
        """Retry (`queue` is its own, later) or dead-letter (`queue` is the DLQ)."""

    async def beat(self, owner: str, queue: str, name: str, ids: list[Any], lease_s: float) -> None:
        """Say the worker is alive; extend the leases of `ids`, and give back any other row
        `owner` holds (leased by a claim whose answer never arrived)."""

    async def release(self, owner: str, queue: str) -> None:
        """Give back what `owner` holds: delivered again at once."""

    async def leave(self, owner: str, queue: str) -> None: ...


class LeasedRunner(HandlingRunner):
    """One consumer: claims up to `prefetch` rows, handles each in a task of its own."""

    def __init__(
        self, consumer: EventConsumer, leases: Leases, metrics: WorkerMetrics | None
    ) -> None:
        super().__init__(consumer, metrics, self._done)
        self._leases = leases
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{self.spec.name}:{uuid.uuid4().hex[:8]}"
        timeout = consumer.handle_timeout_s
        self._lease_s = (timeout if timeout is not None else DEFAULT_LEASE_S) + LEASE_MARGIN_S
        self._rows: dict[asyncio.Task[None], Row] = {}
        self._room = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False

    async def start(self) -> None:
        spec = self.spec
        for key in await self._leases.declare(spec):
            log.info(
                "queue %s: removed binding %s (no longer in its consumer's events)", spec.name, key
            )
        await self.consumer.on_start()
        self._wake = self._leases.wake(spec.name)
        self._loop_task = asyncio.create_task(self._loop(), name=f"b24queue-claim-{spec.name}")
        log.info(
            "consuming %s from %s (bindings %s, prefetch %d, max_attempts %d, retry delays %s: "
            "Retry(delay_s=...) waits the first of these at least as long)",
            spec.name,
            self._leases.where,
            ",".join(spec.bindings),
            self.consumer.prefetch,
            self.consumer.max_attempts,
            ", ".join(f"{d:g}s" for d in sorted(set(spec.retry_delays_s))),
        )

    async def _loop(self) -> None:
        """Claim while there is room; between claims, wait for a wake-up, room or the poll. Each
        heartbeat also extends the leases of the rows still being handled, so a lease runs out
        only when this process is gone. No failure ends the loop: it is retried next round."""
        assert self._wake is not None
        beat_at = 0.0
        while not self._stopping:
            try:
                if time.monotonic() >= beat_at:
                    await self._heartbeat()
                    beat_at = time.monotonic() + HEARTBEAT_S
                free = self.consumer.prefetch - len(self._tasks)
                claimed = await self._claim(free) if free > 0 else 0
            except Exception as exc:  # a database away or locked: next round
                log.warning("worker of %s: %r; retrying", self.spec.name, exc)
                free, claimed = 0, 0
            if claimed and claimed == free:
                continue  # there may be more: claim again as soon as there is room
            self._wake.clear()
            self._room.clear()
            wake = self._wake if free > 0 else self._room
            wait_s = min(self._leases.poll_s if free > 0 else HEARTBEAT_S, HEARTBEAT_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await wake.wait()

    async def _heartbeat(self) -> None:
        name = f"b24queue worker {self.spec.name} {socket.gethostname()}:{os.getpid()}"
        ids = [r.id for row in self._rows.values() for r in (row, *row.replaced)]
        await self._leases.beat(self.owner, self.spec.name, name, ids, self._lease_s)

    async def _claim(self, count: int) -> int:
        queue = self.spec.name
        try:
            rows = await self._leases.claim(self.spec, self.owner, count, self._lease_s)
        except Exception as exc:  # a database away or locked: try again after the poll
            log.warning("claiming from %s failed: %r", queue, exc)
            return 0
        for row in rows:
            self._rows[self._tasks.start(self._handle(row), f"b24queue-{queue}")] = row
        return len(rows)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._rows.pop(task, None)
        self._room.set()

    async def _handle(self, row: Row) -> None:
        incoming = Incoming(
            body=row.body,
            message_id=row.message_id,
            routing_key=str(row.headers.get(c.H_ORIGINAL_ROUTING_KEY) or row.routing_key),
            headers=row.headers,
            redelivered=row.deliveries > 1,
            accepted_at=row.timestamp,
            replaces=tuple(r.message_id for r in row.replaced),
            handle=row,
        )
        if row.deliveries > self.consumer.max_deliveries:
            await give_up(
                incoming,
                self.spec.name,
                self,
                row.deliveries,
                self._observe,
                consumer=self.consumer,
            )
        else:
            await process(self.consumer, incoming, self.spec.name, self, self._observe)

    async def settle(self, incoming: Incoming, outcome: Outcome) -> None:
        row: Row = incoming.handle
        owner, leases = self.owner, self._leases
        if outcome.kind == "ack":
            done = await self._retrying(lambda: leases.ack(row, owner, self.spec.name))
        else:
            queue = self.spec.name if outcome.kind == "retry" else self.spec.dlq
            delay_s = outcome.delay_s or 0.0 if outcome.kind == "retry" else 0.0
            headers = outcome.headers
            done = await self._retrying(
                lambda: leases.move(row, owner, queue=queue, headers=headers, delay_s=delay_s)
            )
        if done is False:
            log.warning(
                "message_id=%s: its lease ran out before it was settled; it is delivered again",
                row.message_id,
            )

    async def _retrying(self, op: Callable[[], Awaitable[Any]]) -> bool | None:
        """A settlement, retried while the database is busy or away for a moment: giving up
        would leave the row until its lease ends (then it is delivered again, not lost)."""
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                return bool(await op())
            except Exception as exc:
                if attempt + 1 == SETTLE_ATTEMPTS:
                    log.error("settling in %s failed (%r); delivered again", self.spec.name, exc)
                    return None
                await asyncio.sleep(0.2 * 2**attempt)
        return None

    async def stop_consuming(self) -> None:
        """Let the loop finish its round rather than cancel it: a claim cancelled mid-statement
        may still commit in the database, leasing rows to a worker that then never hands them
        back (until the lease ends). Cancelled only if the round outlasts `STOP_WAIT_S`."""
        task = self._loop_task
        if task is None:
            return
        self._stopping = True
        for event in (self._wake, self._room):
            if event is not None:
                event.set()
        await asyncio.wait({task}, timeout=STOP_WAIT_S)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._loop_task = None

    async def _drained(self) -> None:
        # Hand back what was not finished (and a claim that committed as the loop stopped):
        # delivered again at once, not after the lease.
        owner, leases = self.owner, self._leases
        await self._retrying(lambda: leases.release(owner, self.spec.name))

    async def _release(self) -> None:
        owner, leases = self.owner, self._leases
        await self._retrying(lambda: leases.leave(owner, self.spec.name))


class LeasedWorkers:
    """A worker process's session on a queue kept in rows or entries: one `LeasedRunner` per
    consumer, all on the transport's `Leases`; `close` calls `closers` in order (what the leases
    run on: a group commit, a listener, a pool)."""

    def __init__(self, leases: Leases, *closers: Callable[[], Awaitable[object]]) -> None:
        self._leases = leases
        self._closers = closers

    def runner(self, consumer: EventConsumer, metrics: WorkerMetrics | None) -> LeasedRunner:
        return LeasedRunner(consumer, self._leases, metrics)

    async def started(self, runners: Sequence[Runner]) -> None:
        return None

    async def close(self) -> None:
        for close in self._closers:
            await close()
