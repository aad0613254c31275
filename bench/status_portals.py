"""What `status`'s portals cost on a queue of a million events (docs/operations.md#portals-waiting).

`python -m bench.status_portals`: on SQLite (a file) and PostgreSQL (a schema of its own, vacuumed
as autovacuum would leave it), a queue of 1,000,000 events in three shapes: one flooded portal
and 19 quiet ones (one event in 50 quiet); one flooded portal and 5,000 quiet ones (past the
1,000 portals read); 1,000 portals of 1,000 events each (the most the bounds let it read). For
each, the median and best of 7 reads of the portals alone, and the median of the whole
overview `status` reads (which counts every row of every queue)."""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
ROWS, RUNS = 1_000_000, 7
# Each shape's portal for event i, in SQL (SQLite and PostgreSQL alike).
SHAPES = {
    "a flood and 19 quiet": "CASE WHEN i % 50 = 0 THEN 'p' || (i % 19) ELSE 'flood' END",
    "a flood and 5,000 quiet": "CASE WHEN i % 50 = 0 THEN 'q' || (i / 50 % 5000) ELSE 'flood' END",
    "1,000 portals of 1,000": "'p' || (i % 1000)",
}


def timed(runs: list[float], started: float) -> None:
    runs.append((time.perf_counter() - started) * 1000)


def report(name: str, shape: str, portals: list[float], overview: list[float]) -> None:
    print(
        f"{name:10} {shape:24} portals: median {statistics.median(portals):7.1f} ms, "
        f"best {min(portals):7.1f} ms; the whole overview: median "
        f"{statistics.median(overview):7.1f} ms"
    )


def on_sqlite(shape: str, portal: str) -> None:
    from b24queue.transports.sqlite import claims
    from b24queue.transports.sqlite import db as schema
    from b24queue.transports.sqlite import queue as q

    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "queue.sqlite3")
        for statement in (*schema._TABLES, *schema._INDEXES):
            db.execute(statement)
        db.execute("INSERT INTO queues VALUES ('q', 'consumer')")
        db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO messages (queue, message_id, routing_key, body, headers, timestamp, "
            f"event_type, available_at, portal) SELECT 'q', 'm' || i, 'E', x'7b7d', '{{}}', 't', "
            f"'E', 0, {portal} FROM n",
            (ROWS,),
        )
        db.commit()
        db.execute("ANALYZE")
        portals: list[float] = []
        overview: list[float] = []
        for _ in range(RUNS):
            started = time.perf_counter()
            claims.portals(db, "q", time.time())
            timed(portals, started)
            started = time.perf_counter()
            q.overview(db, 0)
            timed(overview, started)
        db.close()
    report("SQLite", shape, portals, overview)


async def on_postgres(shape: str, portal: str) -> None:
    import asyncpg

    from b24queue.transports.postgres.db import schema_statements
    from b24queue.transports.postgres.queue import Queries

    name = f"bench_{uuid.uuid4().hex[:10]}"
    db = await asyncpg.connect(PG_URL)
    try:
        for statement in schema_statements(name):
            await db.execute(statement)
        await db.execute(f"INSERT INTO \"{name}\".queues VALUES ('q', 'consumer')")
        await db.execute(
            f'INSERT INTO "{name}".messages (queue, message_id, routing_key, body, headers, '
            f"stamp, event_type, portal) SELECT 'q', 'm' || i, 'E', '\\x7b7d', '{{}}', now(), "
            f"'E', {portal} FROM generate_series(1, $1) i",
            ROWS,
        )
        await db.execute(f'VACUUM ANALYZE "{name}".messages')
        queries = Queries(name)
        portals: list[float] = []
        overview: list[float] = []
        for _ in range(RUNS):
            started = time.perf_counter()
            await queries.claims.portals(db, "q")
            timed(portals, started)
            started = time.perf_counter()
            await queries.overview(db, 5.0)
            timed(overview, started)
    finally:
        await db.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await db.close()
    report("PostgreSQL", shape, portals, overview)


def main() -> None:
    runs: list[Callable[[], None]] = []
    for shape, portal in SHAPES.items():
        runs.append(lambda s=shape, p=portal: on_sqlite(s, p))
        runs.append(lambda s=shape, p=portal: asyncio.run(on_postgres(s, p)))
    for run in runs:
        run()


if __name__ == "__main__":
    main()
