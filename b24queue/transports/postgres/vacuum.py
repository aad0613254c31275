"""The queue's tables vacuumed by its own workers, when dead rows pile up.

Every event leaves two dead rows in `messages` (its claim updates it, its ack deletes it), and
every claim one in `queue_clocks` and `portal_turns`. Until a VACUUM clears them, each claim walks
past them in the indexes: with autovacuum off (or not keeping up), a queue draining 300,000
events slowed from 5,900 to 3,100 events/s as 600,000 dead rows piled up, and the table grew to
475 MB; vacuumed every 50,000 dead rows, the same drain took 45-56 s instead of 71-81 s, and
283 MB (docs/transports/postgresql.md). So a queue does not stay fast only where autovacuum is
tuned for it: each worker process looks at the schema's dead rows every `CHECK_S` (one read of
the statistics views through its pool) and, once they have grown by
`B24QUEUE_POSTGRES_VACUUM_DEAD_ROWS` since its last VACUUM left them, runs a plain VACUUM on a
short-lived connection of its own, one process at a time (an advisory lock, tried, never waited
for). `SKIP_LOCKED`: a table another VACUUM holds (autovacuum) is skipped, never waited for;
`TRUNCATE false`: no ACCESS EXCLUSIVE lock to give back empty pages at the table's end, so claims,
acks and publishes go on throughout. A role that does not own the tables, or a PostgreSQL before
12, cannot: the workers say so once, and leave it to autovacuum.
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
MIN_SERVER_VERSION = 120000  # VACUUM (SKIP_LOCKED, TRUNCATE false)
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
        self._left = 0  # the dead rows its last VACUUM left (an old snapshot still sees them)
        self._refused = False

    def start(self) -> None:
        if self.threshold > 0:
            self._task = asyncio.create_task(self.run(), name="b24queue-postgres-vacuum")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def run(self) -> None:
        """Until cancelled (`stop`): returns once it knows the role cannot vacuum the tables
        (not their owner, or a PostgreSQL before 12)."""
        while not await self._may_vacuum():
            if self._refused:
                return
            await asyncio.sleep(CHECK_S)  # the database away: ask again
        warned = False
        while True:
            await asyncio.sleep(CHECK_S)
            try:
                await self.once()
            except CONNECTION_ERRORS as exc:
                log.debug("vacuum check failed: %r", exc)  # the runners say the database is away
            except asyncpg.PostgresError as exc:  # a lasting refusal: said once, then quietly
                (log.debug if warned else log.warning)("the queue's VACUUM failed: %r", exc)
                warned = True

    async def _may_vacuum(self) -> bool:
        try:
            async with lent(self._pool, self._settings.connect_timeout_s) as db:
                version = int(await db.fetchval("SHOW server_version_num"))
                owned = await db.fetchval(_OWNED, self._schema, list(TABLES))
        except _FAILURES as exc:
            log.debug("cannot tell who owns the queue's tables yet: %r", exc)
            return False
        if version < MIN_SERVER_VERSION:
            log.warning(
                "PostgreSQL %s has no VACUUM (SKIP_LOCKED): the workers leave the queue's "
                "tables to autovacuum; keep it on and eager on %s.messages "
                "(docs/transports/postgresql.md)",
                version,
                self._schema,
            )
        elif not owned:
            log.warning(
                "the role does not own the tables of schema %s: its workers cannot vacuum them; "
                "keep autovacuum on and eager on %s.messages (docs/transports/postgresql.md)",
                self._schema,
                self._schema,
            )
        else:
            return True
        self._refused = True
        return False

    async def dead_rows(self) -> int:
        async with lent(self._pool, self._settings.connect_timeout_s) as db:
            return int(await db.fetchval(_DEAD, self._schema, list(TABLES)))

    async def once(self) -> bool:
        """VACUUM the tables once their dead rows have grown by the threshold since this
        process's last VACUUM left them; True if it ran. (Rows an old snapshot still sees, a long
        report's or an idle transaction's, stay dead through a VACUUM: they must not have every
        check run it again.) One process at a time (an advisory lock, tried, never waited for)."""
        dead = await self.dead_rows()
        self._left = min(self._left, dead)  # cleared meanwhile (autovacuum, another worker)
        if dead < self._left + self.threshold:
            return False
        settings = self._settings
        connection = await asyncpg.connect(
            settings.broker_url,
            timeout=settings.connect_timeout_s,
            command_timeout=VACUUM_TIMEOUT_S,
            server_settings=server_settings(self._name),
        )
        try:
            lock = f"b24queue:{self._schema}:vacuum"
            if not await connection.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", lock):
                return False  # another worker process is at it
            tables = ", ".join(f'"{self._schema}"."{t}"' for t in TABLES)
            # TRUNCATE false: giving back the empty pages at the table's end would take an
            # ACCESS EXCLUSIVE lock, however briefly (and replayed on a standby); they are reused.
            await connection.execute(f"VACUUM (SKIP_LOCKED, TRUNCATE false) {tables}")
        finally:
            await asyncio.gather(connection.close(timeout=5), return_exceptions=True)
        self.runs += 1
        self._left = await self.dead_rows()
        return True
