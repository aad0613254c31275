"""The queue's tables vacuumed by its own workers, when dead rows pile up.

Every event leaves two dead rows in `messages` (its claim updates it, its ack deletes it), and
every claim one in `queue_clocks` and `portal_turns`. Until a VACUUM clears them, each claim walks
past them in the indexes: with autovacuum off (or not keeping up), a queue draining 300,000
events slowed from 5,900 to 3,100 events/s as 600,000 dead rows piled up, and the table grew to
475 MB; vacuumed every 50,000 dead rows, the same drain took 45-56 s instead of 71-81 s, and
267 MB (docs/transports/postgresql.md). So a queue does not stay fast only where autovacuum is tuned
for it: each worker process looks at the schema's dead rows every `CHECK_S` (one read of the
statistics views through its pool) and, past `B24QUEUE_POSTGRES_VACUUM_DEAD_ROWS`, runs a plain
VACUUM (no exclusive lock: claims, acks and publishes go on) on a connection of its own.
`SKIP_LOCKED`: while any other VACUUM holds a table (autovacuum, another worker) it is skipped,
never waited for, so workers never queue up behind each other. A role that does not own the
tables cannot vacuum them: the workers say so once, and leave it to autovacuum.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from b24queue.settings import Settings
from b24queue.transports.postgres.db import CONNECTION_ERRORS, lent, server_settings

log = logging.getLogger(__name__)

# What a check may meet: the database away or restarting, or a statement it refused.
_FAILURES: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)

CHECK_S = 5.0
# A VACUUM of a large table takes its time: not bounded by the few seconds of every other
# statement (b24queue.transports.postgres.db.statement_timeout_s).
VACUUM_TIMEOUT_S = 3600.0
TABLES = ("messages", "portal_turns", "queue_clocks", "queue_sizes", "workers")

_DEAD = (
    "SELECT coalesce(sum(n_dead_tup), 0)::bigint FROM pg_stat_user_tables "
    "WHERE schemaname = $1 AND relname = ANY($2::text[])"
)
_OWNED = (
    "SELECT coalesce(bool_and(pg_has_role(c.relowner, 'USAGE')), false) FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = ANY($2)"
)


class Vacuum:
    """One worker process's watch over the schema's dead rows (`start`, `stop`)."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, name: str) -> None:
        self._settings = settings
        self._pool = pool
        self._name = f"{name} vacuum"
        self.threshold = settings.postgres_vacuum_dead_rows
        self._schema = settings.postgres_schema
        self._task: asyncio.Task[None] | None = None
        self.runs = 0  # VACUUMs this process ran

    def start(self) -> None:
        if self.threshold > 0:
            self._task = asyncio.create_task(self.run(), name="b24queue-postgres-vacuum")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def run(self) -> None:
        """Until cancelled (`stop`): returns at once when the role cannot vacuum the tables."""
        try:
            async with lent(self._pool, self._settings.connect_timeout_s) as db:
                owned = await db.fetchval(_OWNED, self._schema, list(TABLES))
        except _FAILURES as exc:
            log.warning("cannot tell who owns the queue's tables (%r): not vacuuming them", exc)
            return
        if not owned:
            log.warning(
                "the role does not own the tables of schema %s: its workers cannot vacuum them; "
                "keep autovacuum on and eager on %s.messages (docs/transports/postgresql.md)",
                self._schema,
                self._schema,
            )
            return
        while True:
            await asyncio.sleep(CHECK_S)
            try:
                await self.once()
            except _FAILURES as exc:
                # The database away or restarting: the runners say so; look again later.
                log.debug("vacuum check failed: %r", exc)

    async def dead_rows(self) -> int:
        async with lent(self._pool, self._settings.connect_timeout_s) as db:
            return int(await db.fetchval(_DEAD, self._schema, list(TABLES)))

    async def once(self) -> bool:
        """VACUUM the tables if their dead rows are past the threshold; True if it ran."""
        if await self.dead_rows() < self.threshold:
            return False
        settings = self._settings
        connection = await asyncpg.connect(
            settings.broker_url,
            timeout=settings.connect_timeout_s,
            command_timeout=VACUUM_TIMEOUT_S,
            server_settings=server_settings(self._name),
        )
        try:
            tables = ", ".join(f'"{self._schema}"."{t}"' for t in TABLES)
            await connection.execute(f"VACUUM (SKIP_LOCKED) {tables}")
        finally:
            await asyncio.gather(connection.close(timeout=5), return_exceptions=True)
        self.runs += 1
        return True
