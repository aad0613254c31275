"""The embedded SQLite transport: for a small app on one host, no server to run.

One database file (`B24QUEUE_BROKER_URL=sqlite:///path/queue.sqlite3`) shared by the ingress, the
workers and the CLI of that host (never over NFS: SQLite's locking needs a local disk). The same
guarantees as on RabbitMQ (`shared/TRANSPORTS.md`):
- a 200 means the event's rows are committed (WAL, fsync), one row per bound queue, or one in the
  unrouted queue, in one transaction (group-committed with whatever else arrived meanwhile);
- a worker leases up to `prefetch` rows; ack deletes, retry sets the row's `available_at`, dead-
  lettering moves it to `<queue>.dlq`: each one statement, so a crash never leaves two copies or
  none; a crashed worker's rows come back when their lease (`handle_timeout_s` + a margin) ends,
  flagged redelivered;
- retry delays are served by the declared levels, as on RabbitMQ (one rule everywhere);
- a stopping worker hands back what it could not finish at once.
Idle workers wake at once for events published in their own process, else within
`B24QUEUE_SQLITE_POLL_S` (a read, not a write, each time).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from weakref import WeakSet

from b24queue import _constants as c
from b24queue.consumer import EventConsumer
from b24queue.delivery import Incoming, Outcome, process
from b24queue.dlq_view import DeadLetter, fresh_history, letter
from b24queue.envelope import Envelope
from b24queue.errors import BrokerUnavailableError, ConfigError
from b24queue.layout import QueueState, spec_for
from b24queue.metrics import WorkerMetrics
from b24queue.settings import Settings
from b24queue.status import ConnectionRow, QueueRow, Status
from b24queue.transports import Progress, Runner
from b24queue.transports.sqlite import queue as q
from b24queue.transports.sqlite.db import Database

log = logging.getLogger(__name__)

# Without handle_timeout_s a handler may run for ever; its lease must end some time.
DEFAULT_LEASE_S = 30 * 60
LEASE_MARGIN_S = 5.0  # the settle after a handler is cut by its timeout
HEARTBEAT_S = 5.0
SETTLE_ATTEMPTS = 5
ALIVE_S = 3 * HEARTBEAT_S

# Runners of this process, per database file: woken at once by this process's publishes.
_LISTENERS: dict[str, WeakSet[asyncio.Event]] = {}


def _notify(path: Path) -> None:
    for event in list(_LISTENERS.get(str(path.resolve()), ())):
        event.set()


def _listen(path: Path) -> asyncio.Event:
    event = asyncio.Event()
    _LISTENERS.setdefault(str(path.resolve()), WeakSet()).add(event)
    return event


class SqlitePublisher:
    """The ingress's sink: returns once the event's rows are committed."""

    def __init__(self, settings: Settings, path: Path) -> None:
        self._settings = settings
        self._db = Database(path)

    async def __aenter__(self) -> SqlitePublisher:
        await self._db.__aenter__()
        unrouted = self._settings.unrouted
        await self._db.write(lambda db: q.declare_unrouted(db, unrouted))
        log.info("publishing to %s (sqlite)", self._db.path)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._db.__aexit__()

    def is_ready(self) -> bool:
        return True

    async def failed(self) -> BaseException:
        await asyncio.get_running_loop().create_future()  # never: there is no connection to lose
        raise AssertionError("unreachable")

    async def publish(self, envelope: Envelope) -> None:
        unrouted, timeout_s = self._settings.unrouted, self._settings.publish_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await self._db.write(lambda db: q.publish(db, [envelope], unrouted))
        except TimeoutError:
            # The write may still commit: the event is then there, and answered 503 (at least
            # once; Bitrix24 does not resend it, nothing is lost).
            raise BrokerUnavailableError(
                f"the queue database did not commit within {timeout_s:g}s"
            ) from None
        except Exception as exc:  # a full disk, a lock held too long
            raise BrokerUnavailableError(f"the queue database refused the write: {exc!r}") from None
        _notify(self._db.path)


class SqliteRunner:
    """One consumer: claims up to `prefetch` rows, handles each in a task of its own."""

    def __init__(
        self,
        consumer: EventConsumer,
        settings: Settings,
        db: Database,
        metrics: WorkerMetrics | None,
    ) -> None:
        self.consumer = consumer
        self.spec = spec_for(type(consumer))
        self._settings = settings
        self._db = db
        self._observe = metrics.observe if metrics is not None else None
        self._gauge = metrics.in_flight.labels(consumer.queue) if metrics is not None else None
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{self.spec.name}:{uuid.uuid4().hex[:8]}"
        timeout = consumer.handle_timeout_s
        self._lease_s = (timeout if timeout is not None else DEFAULT_LEASE_S) + LEASE_MARGIN_S
        self._tasks: set[asyncio.Task[None]] = set()
        self._rows: dict[asyncio.Task[None], q.Row] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        spec = self.spec
        _, removed = await self._db.write(
            lambda db: q.declare(db, spec.name, spec.dlq, spec.bindings)
        )
        for key in removed:
            log.info(
                "queue %s: removed binding %s (no longer in its consumer's events)", spec.name, key
            )
        await self.consumer.on_start()
        self._wake = _listen(self._db.path)
        self._loop_task = asyncio.create_task(self._loop(), name=f"b24queue-claim-{spec.name}")
        log.info(
            "consuming %s from %s (bindings %s, prefetch %d, max_attempts %d, retry delays %s: "
            "Retry(delay_s=...) waits the first of these at least as long)",
            spec.name,
            self._db.path,
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
        while True:
            try:
                if time.monotonic() >= beat_at:
                    await self._heartbeat()
                    beat_at = time.monotonic() + HEARTBEAT_S
                free = self.consumer.prefetch - len(self._tasks)
                claimed = await self._claim(free) if free > 0 else 0
            except Exception as exc:  # a database locked past its timeout: next round
                log.warning("worker of %s: %r; retrying", self.spec.name, exc)
                free, claimed = 0, 0
            if claimed and claimed == free:
                continue  # there may be more: claim again as soon as there is room
            self._wake.clear()
            self._room.clear()
            wake = self._wake if free > 0 else self._room
            wait_s = min(self._settings.sqlite_poll_s if free > 0 else HEARTBEAT_S, HEARTBEAT_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await wake.wait()

    async def _heartbeat(self) -> None:
        owner, queue, lease_s = self.owner, self.spec.name, self._lease_s
        name = f"b24queue worker {queue} {socket.gethostname()}:{os.getpid()}"
        ids = [row.id for row in self._rows.values()]

        def beat(db: sqlite3.Connection) -> None:
            q.heartbeat(db, owner, queue, name)
            q.renew(db, owner, ids, lease_s)

        await self._db.write(beat)

    async def _claim(self, count: int) -> int:
        queue, owner, lease_s = self.spec.name, self.owner, self._lease_s
        try:
            if not await self._db.read(lambda db: q.due(db, queue)):
                return 0
            rows = await self._db.write(lambda db: q.claim(db, queue, owner, count, lease_s))
        except Exception as exc:  # a locked or failing database: try again after the poll
            log.warning("claiming from %s failed: %r", queue, exc)
            return 0
        for row in rows:
            task = asyncio.create_task(self._handle(row), name=f"b24queue-{queue}")
            self._tasks.add(task)
            self._rows[task] = row
            self._idle.clear()
            task.add_done_callback(self._done)
        return len(rows)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._rows.pop(task, None)
        self._room.set()
        if not self._tasks:
            self._idle.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task crashed", exc_info=task.exception())

    async def _handle(self, row: q.Row) -> None:
        incoming = Incoming(
            body=row.body,
            message_id=row.message_id,
            routing_key=str(row.headers.get(c.H_ORIGINAL_ROUTING_KEY) or row.routing_key),
            headers=row.headers,
            redelivered=row.deliveries > 1,
            accepted_at=row.timestamp,
            handle=row,
        )
        if self._gauge is not None:
            self._gauge.inc()
        try:
            await process(self.consumer, incoming, self.spec.name, self, self._observe)
        finally:
            if self._gauge is not None:
                self._gauge.dec()

    async def settle(self, incoming: Incoming, outcome: Outcome) -> None:
        row: q.Row = incoming.handle
        owner = self.owner
        if outcome.kind == "ack":
            done = await self._write(lambda db: q.ack(db, row, owner))
        else:
            queue = self.spec.name if outcome.kind == "retry" else self.spec.dlq
            delay_s = outcome.delay_s or 0.0 if outcome.kind == "retry" else 0.0
            headers = outcome.headers
            done = await self._write(
                lambda db: q.move(db, row, owner, queue=queue, headers=headers, delay_s=delay_s)
            )
        if done is False:
            log.warning(
                "message_id=%s: its lease ran out before it was settled; it is delivered again",
                row.message_id,
            )

    async def _write(self, op: q.WriteOp) -> bool | None:
        """A settlement, retried while the database is busy (another process holding the write
        lock): giving up would leave the row until its lease ends."""
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                return bool(await self._db.write(op))
            except Exception as exc:
                if attempt + 1 == SETTLE_ATTEMPTS:  # the lease runs out: delivered again, not lost
                    log.error("settling in %s failed (%r); delivered again", self.spec.name, exc)
                    return None
                await asyncio.sleep(0.2 * 2**attempt)
        return None

    async def stop_consuming(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None

    async def drain(self, timeout_s: float) -> int:
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        left = list(self._tasks)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        # Hand back what was not finished (and a claim that committed as the loop stopped):
        # delivered again at once, not after the lease.
        owner = self.owner
        await self._write(lambda db: q.release(db, owner) >= 0)
        return len(left)

    async def close(self) -> None:
        try:
            await self.consumer.on_stop()
        finally:
            owner = self.owner
            await self._write(lambda db: q.leave(db, owner) >= 0)


class SqliteWorkers:
    def __init__(self, settings: Settings, db: Database) -> None:
        self._settings = settings
        self._db = db

    def runner(self, consumer: EventConsumer, metrics: WorkerMetrics | None) -> SqliteRunner:
        return SqliteRunner(consumer, self._settings, self._db, metrics)

    async def started(self, runners: Sequence[Runner]) -> None:
        return None

    async def close(self) -> None:
        await self._db.__aexit__()


class Sqlite:
    name = "sqlite"
    needs_spool = False  # the queue is on the ingress's own disk

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = Path(settings.sqlite_path)

    def publisher(self, connection_name: str) -> SqlitePublisher:
        return SqlitePublisher(self.settings, self.path)

    async def open_workers(self, classes: Sequence[type[EventConsumer]]) -> SqliteWorkers:
        db = Database(self.path)
        await db.__aenter__()
        return SqliteWorkers(self.settings, db)

    async def declare(self, classes: Sequence[type[EventConsumer]]) -> list[QueueState]:
        unrouted = self.settings.unrouted
        async with Database(self.path) as db:
            await db.write(lambda conn: q.declare_unrouted(conn, unrouted))
            for cls in classes:
                spec = spec_for(cls)
                declare = functools.partial(
                    q.declare, queue=spec.name, dlq=spec.dlq, patterns=spec.bindings
                )
                _, removed = await db.write(declare)
                for key in removed:
                    log.info("queue %s: removed binding %s", spec.name, key)
            names = [unrouted] + [n for cls in classes for n in (cls.queue, cls.queue + ".dlq")]
            counts = await db.read(lambda conn: q.depths(conn))
        return [QueueState(n, counts.get(n, 0), 0, {"transport": "sqlite"}) for n in names]

    async def status(self) -> Status:
        async with Database(self.path) as db:
            view = await db.read(lambda conn: q.overview(conn, time.time() - ALIVE_S))
        return _status(self.settings, view)

    def dead_letters(self, queue: str) -> SqliteDeadLetters:
        return SqliteDeadLetters(self.settings, self.path, queue)


def _status(settings: Settings, view: q.Overview) -> Status:
    rows = []
    for name in sorted(view.consumer_queues):
        d = view.queues.get(name, q.Depth())
        rows.append(
            QueueRow(
                queue=name,
                type="sqlite",
                ready=d.ready,
                unacked=d.leased,
                consumers=view.workers.get(name, 0),
                publish_per_s=0.0,
                deliver_per_s=0.0,
                ack_per_s=0.0,
                retrying=d.later,
                dead_letters=view.queues.get(name + c.DLQ_SUFFIX, q.Depth()).total,
            )
        )
    unrouted = view.queues.get(settings.unrouted, q.Depth()).total
    problems = [f"{r.queue}{c.DLQ_SUFFIX} holds {r.dead_letters}" for r in rows if r.dead_letters]
    if unrouted:
        problems.append(f"{settings.unrouted} holds {unrouted}")
    connections = [ConnectionRow(name, "running", 0) for name in sorted(view.worker_names)]
    return Status(rows, unrouted, connections, problems)


class SqliteDeadLetters:
    """`b24queue dlq` on the SQLite queue: a replay moves rows back in the same transaction that
    takes them out of the DLQ (or routes unrouted ones again): nothing duplicated, nothing lost."""

    def __init__(self, settings: Settings, path: Path, name: str) -> None:
        self._settings = settings
        self._db = Database(path)
        if name == settings.unrouted:
            self.source, self._back_to = name, None
            self.destination = "the queues bound to it now"
        else:
            queue = name.removesuffix(c.DLQ_SUFFIX)
            if not queue:
                raise ConfigError(f"not a queue name: {name!r}")
            self.source, self._back_to = queue + c.DLQ_SUFFIX, queue
            self.destination = queue

    async def __aenter__(self) -> SqliteDeadLetters:
        await self._db.__aenter__()
        source = self.source
        if not await self._db.read(lambda db: q.exists(db, source)):
            await self._db.__aexit__()
            raise ConfigError(f"queue {source!r} does not exist")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._db.__aexit__()

    async def count(self) -> int:
        source = self.source
        return int(await self._db.read(lambda db: q.depths(db).get(source, 0)))

    async def list(self, limit: int) -> tuple[int, list[DeadLetter]]:
        source = self.source
        rows = await self._db.read(lambda db: q.first(db, source, limit))
        return await self.count(), [_describe(r) for r in rows]

    async def replay(
        self,
        *,
        limit: int | None = None,
        ids: set[str] | None = None,
        progress: Progress | None = None,
    ) -> tuple[int, int]:
        total = await self.count()
        wanted = total if limit is None else min(limit, total)
        replayed, after = 0, -1
        source, back_to, unrouted = self.source, self._back_to, self._settings.unrouted
        while replayed < wanted:
            rows = await self._db.read(
                functools.partial(q.first, queue=source, limit=100, after=after)
            )
            if not rows:
                break
            for row in rows:
                after = row.id
                if ids is not None and row.message_id not in ids:
                    continue
                if replayed >= wanted:
                    break
                if ids is not None:
                    ids.discard(row.message_id)
                headers = fresh_history(row.headers)
                moved = await self._db.write(
                    functools.partial(
                        q.replay,
                        row=row,
                        headers=headers,
                        back_to=back_to,
                        unrouted=unrouted,
                        source=source,
                    )
                )
                if not moved:
                    continue  # gone meanwhile, or still bound by no queue: it stays
                replayed += 1
                if progress is not None and (replayed % 100 == 0 or replayed == wanted):
                    progress(replayed, wanted)
        if replayed:
            _notify(self._db.path)
        return replayed, total

    async def purge(self, count: int) -> int:
        source = self.source
        return int(await self._db.write(lambda db: q.purge(db, source, count)))


def _describe(row: q.Row) -> DeadLetter:
    return letter(
        row.headers,
        message_id=row.message_id,
        event=row.event_type or row.routing_key,
        published_at=row.timestamp,
        size_bytes=len(row.body),
    )


def transport(settings: Settings) -> Sqlite:
    return Sqlite(settings)
