"""The PostgreSQL transport's worker side: the `Leases` of `b24queue.transports.kit.leased` on a
small connection pool, acks group-committed (one DELETE for all that finished meanwhile),
wake-ups by LISTEN/NOTIFY with a poll behind them.

The poll is one per worker process, not one per runner: every `B24QUEUE_POSTGRES_POLL_S` one
statement reads which of its queues have something due (a notification lost, a retry whose delay
ended, a lease that ran out) and wakes just those runners. With 100 consumers an idle worker ran
100 claims a second, 5% of a core."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from b24queue import _constants as c
from b24queue.queues import QueueSpec
from b24queue.settings import Settings
from b24queue.transports.kit.batching import Batcher
from b24queue.transports.kit.leased import HEARTBEAT_S, LeasedWorkers, Row
from b24queue.transports.postgres.db import CONNECTION_ERRORS, Listener, lent
from b24queue.transports.postgres.queue import Queries
from b24queue.transports.postgres.vacuum import Vacuum

log = logging.getLogger(__name__)

POOL_SIZE = 4


@dataclass(frozen=True, slots=True)
class Settle:
    row: Row
    owner: str
    queue: str | None = None  # None: ack; the consumer's queue: retry; its DLQ: dead-letter
    headers: dict[str, Any] = field(default_factory=dict)
    delay_s: float = 0.0
    wakes: str | None = None  # an ordered queue: its group's next event may be due once settled


class PostgresLeases:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, listener: Listener) -> None:
        self._pool = pool
        self._listener = listener
        self._q = Queries(settings.postgres_schema)
        self.where = f"{settings.redacted_broker_url()} schema {settings.postgres_schema}"
        # A runner's own look, woken or not: the watch wakes it when its queue has work.
        self.poll_s = HEARTBEAT_S
        self._watch_s = settings.postgres_poll_s
        # The runners' queues (for the watch), and which have an order key (their settles notify).
        self._queues: dict[str, bool] = {}
        self._watch: asyncio.Task[None] | None = None
        self._timeout_s = settings.connect_timeout_s
        # Settlements are group-committed, in the order handlers finished: one transaction for
        # whatever finished meanwhile (all acks in one DELETE); a DLQ keeps the order of failures.
        self._settles: Batcher[Settle, bool] = Batcher(
            self._settle_batch, "b24queue-pg-settle", CONNECTION_ERRORS
        )
        self._settles.start()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await self._settles.stop()

    async def declare(self, spec: QueueSpec) -> list[str]:
        async with lent(self._pool, self._timeout_s) as db:
            removed = await self._q.declare(db, spec.name, spec.dlq, spec.bindings)
        self._queues[spec.name] = spec.ordering.on
        return removed

    def wake(self, queue: str) -> asyncio.Event:
        if self._watch is None:
            self._watch = asyncio.create_task(self._watching(), name="b24queue-postgres-watch")
        return self._listener.event(queue)

    async def _watching(self) -> None:
        while True:
            await asyncio.sleep(self._watch_s)
            try:
                async with lent(self._pool, self._timeout_s) as db:
                    due = await self._q.due_among(db, list(self._queues))
            except Exception as exc:  # the database away: the runners say so at their claims
                log.debug("the PostgreSQL watch failed: %r", exc)
                continue
            for queue in due:
                self._listener.event(queue).set()

    async def claim(self, spec: QueueSpec, owner: str, count: int, lease_s: float) -> list[Row]:
        async with lent(self._pool, self._timeout_s) as db:
            return await self._q.claim(
                db, spec.name, owner, count, lease_s, spec.fairness, spec.ordering
            )

    async def _settle_batch(self, items: list[Settle]) -> list[bool]:
        done: dict[int, bool] = {}
        async with lent(self._pool, self._timeout_s) as db, db.transaction():
            for i, s in enumerate(items):
                if s.queue is not None:
                    done[i] = await self._q.move(
                        db,
                        s.row,
                        s.owner,
                        queue=s.queue,
                        headers=s.headers,
                        delay_s=s.delay_s,
                        dead_letter=s.queue.endswith(c.DLQ_SUFFIX),
                    )
            acks = [(i, s) for i, s in enumerate(items) if s.queue is None]
            if acks:
                acked = await self._q.ack(db, [(s.row, s.owner) for _, s in acks])
                done.update((i, ok) for (i, _), ok in zip(acks, acked, strict=True))
            wakes = sorted({s.wakes for s in items if s.wakes is not None})
            if wakes:  # every process's workers of those queues look now, not at their poll
                await db.execute(
                    "SELECT pg_notify($1, q) FROM unnest($2::text[]) AS q", self._q.channel, wakes
                )
        return [done[i] for i in range(len(items))]

    async def ack(self, row: Row, owner: str, queue: str) -> bool:
        return await self._settles.submit(Settle(row, owner, wakes=self._wakes(queue)))

    async def move(
        self, row: Row, owner: str, *, queue: str, headers: dict[str, Any], delay_s: float
    ) -> bool:
        wakes = self._wakes(queue.removesuffix(c.DLQ_SUFFIX))
        moved = await self._settles.submit(Settle(row, owner, queue, headers, delay_s, wakes))
        if moved and not queue.endswith(c.DLQ_SUFFIX):
            # Due then: this process looks at once (other workers by their poll).
            wake = self.wake(queue)
            asyncio.get_running_loop().call_later(delay_s, wake.set)
        return moved

    def _wakes(self, queue: str) -> str | None:
        return queue if self._queues.get(queue) else None

    async def beat(self, owner: str, queue: str, name: str, ids: list[int], lease_s: float) -> None:
        async with lent(self._pool, self._timeout_s) as db:
            await self._q.beat(db, owner, queue, name, ids, lease_s)

    async def release(self, owner: str, queue: str) -> None:
        async with lent(self._pool, self._timeout_s) as db:
            await self._q.release(db, owner)

    async def leave(self, owner: str, queue: str) -> None:
        async with lent(self._pool, self._timeout_s) as db:
            await self._q.leave(db, owner)


def workers(settings: Settings, pool: asyncpg.Pool, listener: Listener, name: str) -> LeasedWorkers:
    """A worker process's session: its runners share the pool, the listener, one group commit
    of settlements and the watch over dead rows."""
    leases = PostgresLeases(settings, pool, listener)
    vacuum = Vacuum(settings, pool, name)
    vacuum.start()

    async def close_pool() -> None:
        await asyncio.gather(asyncio.wait_for(pool.close(), 10), return_exceptions=True)

    return LeasedWorkers(leases, vacuum.stop, leases.close, listener.stop, close_pool)
