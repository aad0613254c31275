"""The SQLite transport's operator side: `status` and `b24queue dlq` from SQL."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from b24queue import _constants as c
from b24queue.dlq_view import DeadLetter, fresh_history, letter
from b24queue.errors import ConfigError
from b24queue.settings import Settings
from b24queue.status import ConnectionRow, QueueRow, Status
from b24queue.transports import Progress
from b24queue.transports.sqlite import queue as q
from b24queue.transports.sqlite.db import Database, notify

log = logging.getLogger(__name__)


def sqlite_status(settings: Settings, view: q.Overview) -> Status:
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
            notify(self._db.path)
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
