"""The operator's side of a queue kept in database rows (SQLite, PostgreSQL): `status` from one
overview query, and `b24queue dlq` whose replay moves a row back in the same transaction that takes
it out of the DLQ (or routes an unrouted one again): nothing duplicated, nothing lost."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from b24queue import _constants as c
from b24queue.errors import ConfigError
from b24queue.settings import Settings
from b24queue.transports import Progress, silent
from b24queue.transports.dead_letters import DeadLetter, fresh_history, letter
from b24queue.transports.kit.leased import Row
from b24queue.transports.status import (
    ConnectionRow,
    PortalCount,
    PortalsWaiting,
    QueueRow,
    Status,
    problems,
)

CONSUMER, DLQ, UNROUTED = "consumer", "dlq", "unrouted"  # the kinds of queue rows
# `status`'s portals of a consumer queue: its first PORTALS_READ portals (by the portal index, one
# probe each), each one's events counted up to PORTAL_EVENTS_READ past those in handlers, and the
# TOP_PORTALS with the most. What it reads is bounded whatever the backlog: docs/operations.md.
PORTALS_READ = 1000
PORTAL_EVENTS_READ = 10_000
TOP_PORTALS = 3


@dataclass(frozen=True, slots=True)
class Depth:
    ready: int = 0  # due and free
    leased: int = 0  # a worker is on it
    later: int = 0  # waiting for its retry delay

    @property
    def total(self) -> int:
        return self.ready + self.leased + self.later


@dataclass(frozen=True, slots=True)
class Overview:
    consumer_queues: list[str]
    queues: dict[str, Depth]
    workers: dict[str, int]  # live workers per queue
    worker_names: list[str]
    portals: dict[str, PortalsWaiting] = field(default_factory=dict)  # by consumer queue


def portals_waiting(
    counted: Iterable[tuple[str, int]], leased: Mapping[str, int], read_all: bool
) -> PortalsWaiting:
    """From each portal read, its rows in the queue as counted (up to `PORTAL_EVENTS_READ` past
    its `leased` ones, those in handlers now, and one more), and whether every portal was read."""
    waiting = []
    for portal, rows in counted:
        n = rows - leased.get(portal, 0)
        if n > 0:
            more = n > PORTAL_EVENTS_READ
            waiting.append(PortalCount(portal, min(n, PORTAL_EVENTS_READ), more))
    top = sorted(waiting, key=lambda p: (-p.waiting, p.portal))[:TOP_PORTALS]
    return PortalsWaiting(len(waiting), not read_all, top)


def table_status(settings: Settings, view: Overview, kind: str) -> Status:
    rows = []
    for name in sorted(view.consumer_queues):
        d = view.queues.get(name, Depth())
        rows.append(
            QueueRow(
                queue=name,
                type=kind,
                ready=d.ready,
                unacked=d.leased,
                consumers=view.workers.get(name, 0),
                publish_per_s=0.0,
                deliver_per_s=0.0,
                ack_per_s=0.0,
                retrying=d.later,
                dead_letters=view.queues.get(name + c.DLQ_SUFFIX, Depth()).total,
                portals=view.portals.get(name),
            )
        )
    unrouted = view.queues.get(settings.unrouted, Depth()).total
    connections = [ConnectionRow(name, "running", 0) for name in sorted(view.worker_names)]
    return Status(rows, unrouted, connections, problems(settings, rows, unrouted))


class Shelf(Protocol):
    """A database's DLQ operations; each call one transaction."""

    async def exists(self, queue: str) -> bool: ...

    async def count(self, queue: str) -> int: ...

    async def first(self, queue: str, limit: int, after: Any) -> list[Row]:
        """In order, from after id `after` (None: from the start; a large queue is read in
        pieces)."""

    async def replay(
        self, row: Row, headers: dict[str, Any], back_to: str | None, source: str
    ) -> bool:
        """Back to `back_to`, or (None) to the queues bound to its event now; False, changing
        nothing, when the row has left `source` or no queue binds it yet."""

    async def purge(self, queue: str, count: int) -> int: ...


class TableDeadLetters:
    """`b24queue dlq` on one queue: a consumer queue's DLQ, or the unrouted queue."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        opened: Callable[[], Awaitable[Shelf]],
        closed: Callable[[], Awaitable[None]],
    ) -> None:
        self._opened, self._closed = opened, closed
        self._shelf: Shelf | None = None
        if name == settings.unrouted:
            self.source, self._back_to = name, None
            self.destination = "the queues bound to it now"
        else:
            queue = name.removesuffix(c.DLQ_SUFFIX)
            if not queue:
                raise ConfigError(f"not a queue name: {name!r}")
            self.source, self._back_to = queue + c.DLQ_SUFFIX, queue
            self.destination = queue

    @property
    def shelf(self) -> Shelf:
        assert self._shelf is not None, "use `async with`"
        return self._shelf

    async def __aenter__(self) -> TableDeadLetters:
        self._shelf = await self._opened()
        if not await self._shelf.exists(self.source):
            await self._closed()
            raise ConfigError(f"queue {self.source!r} does not exist")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._closed()

    async def count(self) -> int:
        return await self.shelf.count(self.source)

    async def list(self, limit: int) -> tuple[int, list[DeadLetter]]:
        rows = await self.shelf.first(self.source, limit, None)
        return await self.count(), [_describe(r) for r in rows]

    async def replay(
        self, *, limit: int | None = None, ids: set[str] | None = None, progress: Progress = silent
    ) -> tuple[int, int]:
        total = await self.count()
        wanted = total if limit is None else min(limit, total)
        replayed, after = 0, None
        while replayed < wanted:
            rows = await self.shelf.first(self.source, 100, after)
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
                if not await self.shelf.replay(row, headers, self._back_to, self.source):
                    continue  # gone meanwhile, or still bound by no queue: it stays
                replayed += 1
                if replayed % 100 == 0 or replayed == wanted:
                    progress(replayed, wanted)
        return replayed, total

    async def purge(self, count: int) -> int:
        return await self.shelf.purge(self.source, count)


def _describe(row: Row) -> DeadLetter:
    return letter(
        row.headers,
        message_id=row.message_id,
        event=row.event_type or row.routing_key,
        published_at=row.timestamp,
        size_bytes=len(row.body),
    )
