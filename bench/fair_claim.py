"""The fair claim's cost, and the publish's, on the two database queues, and the claim's on
Redis Streams (docs/fairness.md).

`python -m bench.fair_claim`: a queue with a flood of 20,000 events of one portal and 19 quiet
portals of 5 events each; 31 rows in handlers; then 500 claims of one slot (what a runner asks
as each handler ends), each followed by the ack of the oldest row in handlers (and a new event
for a quiet portal whose event was taken: they stay at 5 waiting). Reports the median and p99 of
the claim alone (its transaction), fair vs first in, first out, and fair with a cap of 4; then
the time to publish 20,000 events in batches of 50 (one transaction each).

`--publish-only`: only the publish figure, from whichever b24queue is on the path (run it once
with PYTHONPATH pointing at an older checkout for the figure before the portal column).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from b24queue import _constants as c
from b24queue.events.envelope import Envelope

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
FLOOD, QUIET, CLAIMS, IN_FLIGHT, BATCH = 20_000, 19, 500, 31, 50


def envelopes(member_id: str, n: int) -> list[Envelope]:
    now = datetime.now(UTC)
    headers = {c.H_MEMBER_ID: member_id}
    return [
        Envelope(uuid.uuid4().hex, "ONCRMDEALADD", b'{"event":"ONCRMDEALADD"}', headers, now, "ONX")
        for _ in range(n)
    ]


def quiet(i: int) -> str:
    return f"quiet{i:02d}".ljust(32, "0")


def figures(times: list[float]) -> str:
    times = sorted(times)
    p99 = times[int(len(times) * 0.99) - 1]
    return f"median {statistics.median(times) * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms"


def modes() -> Iterator[tuple[str, Any]]:
    from b24queue.queues import Fairness

    yield "first in, first out", Fairness(on=False)
    yield "fair", Fairness(on=True)
    yield "fair, cap 4", Fairness(on=True, cap=4)


def sqlite_claims() -> None:
    for label, fairness in modes():
        with tempfile.TemporaryDirectory() as tmp:
            times = sqlite_claim_times(Path(tmp) / "q.sqlite3", fairness)
        print(f"sqlite claim, {label}: {figures(times)}")


def sqlite_claim_times(path: Path, fairness: Any) -> list[float]:
    import sqlite3

    from b24queue.transports.sqlite import queue as q
    from b24queue.transports.sqlite.db import connect

    db = connect(path)

    def tx(op: Callable[[sqlite3.Connection], Any]) -> Any:
        with db:
            db.execute("BEGIN IMMEDIATE")
            return op(db)

    def fill(d: sqlite3.Connection) -> None:
        q.declare(d, "w", "w.dlq", ("#",))
        q.publish(d, envelopes("flood".ljust(32, "0"), FLOOD), "un")
        for i in range(QUIET):
            q.publish(d, envelopes(quiet(i), 5), "un")

    tx(fill)
    held = tx(lambda d: q.claim(d, "w", "o", IN_FLIGHT, 60, fairness))
    times = []
    for _ in range(CLAIMS):
        t0 = time.perf_counter()
        [row] = tx(lambda d: q.claim(d, "w", "o", 1, 60, fairness))
        times.append(time.perf_counter() - t0)
        held.append(row)
        done = held.pop(0)
        member = str(done.headers[c.H_MEMBER_ID])
        tx(lambda d, r=done, m=member: (q.ack(d, r, "o"), _refill(d, m)))
    db.close()
    return times


def _refill(db: Any, member: str) -> None:
    from b24queue.transports.sqlite import queue as q

    if member.startswith("quiet"):
        q.publish(db, envelopes(member, 1), "un")


def sqlite_publish() -> None:
    from b24queue.transports.sqlite import queue as q
    from b24queue.transports.sqlite.db import connect

    with tempfile.TemporaryDirectory() as tmp:
        db = connect(Path(tmp) / "q.sqlite3")
        with db:
            q.declare(db, "w", "w.dlq", ("#",))
        batches = [envelopes(quiet(i % 20), BATCH) for i in range(FLOOD // BATCH)]
        t0 = time.perf_counter()
        for batch in batches:
            with db:
                db.execute("BEGIN IMMEDIATE")
                q.publish(db, batch, "un")
        took = time.perf_counter() - t0
        db.close()
    print(f"sqlite publish: {FLOOD} in batches of {BATCH}: {took / FLOOD * 1e6:.1f} µs/event")


async def pg_claims() -> None:
    import asyncpg

    from b24queue.transports.postgres.db import ensure_schema
    from b24queue.transports.postgres.queue import Queries

    for label, fairness in modes():
        schema = f"fairbench{uuid.uuid4().hex[:8]}"
        db = await asyncpg.connect(PG_URL)
        try:
            await ensure_schema(db, schema)
            q = Queries(schema)
            await q.declare(db, "w", "w.dlq", ("#",))
            await q.declare_unrouted(db, "un")
            flood = envelopes("flood".ljust(32, "0"), FLOOD)
            for i in range(0, FLOOD, 1000):
                await q.publish(db, flood[i : i + 1000], "un")
            for i in range(QUIET):
                await q.publish(db, envelopes(quiet(i), 5), "un")
            await db.execute(f'ANALYZE "{schema}".messages')
            held = await q.claim(db, "w", "o", IN_FLIGHT, 60, fairness)
            times = []
            for _ in range(CLAIMS):
                t0 = time.perf_counter()
                [row] = await q.claim(db, "w", "o", 1, 60, fairness)
                times.append(time.perf_counter() - t0)
                held.append(row)
                done = held.pop(0)
                await q.ack(db, [(done, "o")])
                member = str(done.headers[c.H_MEMBER_ID])
                if member.startswith("quiet"):
                    await q.publish(db, envelopes(member, 1), "un")
        finally:
            await db.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await db.close()
        print(f"postgres claim, {label}: {figures(times)}")


async def pg_publish() -> None:
    import asyncpg

    from b24queue.transports.postgres.db import ensure_schema
    from b24queue.transports.postgres.queue import Queries

    schema = f"fairbench{uuid.uuid4().hex[:8]}"
    db = await asyncpg.connect(PG_URL)
    try:
        await ensure_schema(db, schema)
        q = Queries(schema)
        await q.declare(db, "w", "w.dlq", ("#",))
        await q.declare_unrouted(db, "un")
        batches = [envelopes(quiet(i % 20), BATCH) for i in range(FLOOD // BATCH)]
        t0 = time.perf_counter()
        for batch in batches:
            await q.publish(db, batch, "un")
        took = time.perf_counter() - t0
    finally:
        await db.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await db.close()
    print(f"postgres publish: {FLOOD} in batches of {BATCH}: {took / FLOOD * 1e6:.1f} µs/event")


async def redis_claims() -> None:
    """The same on Redis Streams (the shared server, under a prefix of its own, removed after)."""
    from b24queue.queues import QueueSpec
    from b24queue.settings import load_settings
    from b24queue.transports.redis_streams.connection import connect
    from b24queue.transports.redis_streams.store import Store

    for label, fairness in modes():
        prefix = f"fairbench{uuid.uuid4().hex[:8]}"
        settings = load_settings(broker_url=REDIS_URL, redis_prefix=prefix, unrouted="un")
        store = Store(connect(settings, "fairbench"), settings)
        try:
            await store.declare(QueueSpec("w", ("#",), (), fairness=fairness))
            flood = envelopes("flood".ljust(32, "0"), FLOOD)
            for i in range(0, FLOOD, 1000):
                await store.publish(flood[i : i + 1000])
            for i in range(QUIET):
                await store.publish(envelopes(quiet(i), 5))
            held = await store.claim("w", "o", IN_FLIGHT, 60, fairness)
            times, empty = [], 0
            for _ in range(CLAIMS):
                t0 = time.perf_counter()
                got = await store.claim("w", "o", 1, 60, fairness)
                times.append(time.perf_counter() - t0)
                if not got:  # every portal parked is capped: the next claim parks more
                    empty += 1
                    continue
                [row] = got
                held.append(row)
                done = held.pop(0)
                await store.ack("w", [(done, "o")])
                member = str(done.headers[c.H_MEMBER_ID])
                if member.startswith("quiet"):
                    await store.publish(envelopes(member, 1))
        finally:
            keys = [k async for k in store.client.scan_iter(f"{prefix}:*")]
            for i in range(0, len(keys), 500):
                await store.client.delete(*keys[i : i + 500])
            await store.client.aclose()
        slowest = max(times) * 1e3
        print(f"redis claim, {label}: {figures(times)}, slowest {slowest:.1f} ms, {empty} empty")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publish-only", action="store_true")
    parser.add_argument("--redis-only", action="store_true", help="only the Redis claims")
    args = parser.parse_args()
    import b24queue

    print(f"b24queue from {Path(b24queue.__file__).parent}", file=sys.stderr)
    if args.redis_only:
        asyncio.run(redis_claims())
        return
    if not args.publish_only:
        sqlite_claims()
        asyncio.run(pg_claims())
    sqlite_publish()
    asyncio.run(pg_publish())


if __name__ == "__main__":
    main()
