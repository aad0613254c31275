"""The ordered claim's cost on the two database queues, beside the same claim without an order
(docs/fairness.md, "Order within an entity").

`python -m bench.ordered_claim`: the queue of `bench.fair_claim` (a flood of 20,000 events of one
portal, 19 quiet portals of 5 each, 31 rows in handlers, then 500 claims of one slot, each followed
by the ack of the oldest row in handlers), its events keyed `data.FIELDS.ID` with 1,000 deals in
the flood (20 events each) and one per quiet event. Reports the median and p99 of the claim alone
(its transaction), fair and first in, first out, without an order and under each rule; and the
time of the first ordered claims on that backlog unkeyed (a queue upgraded, or a burst): the rows
keyed `STAMP_BATCH` per claim, until all are.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from b24queue import _constants as c
from b24queue.events.envelope import Envelope
from bench.fair_claim import CLAIMS, FLOOD, IN_FLIGHT, PG_URL, QUIET, figures, quiet

FLOOD_DEALS = 1000


def envelopes(member_id: str, n: int, deal: Callable[[int], str]) -> list[Envelope]:
    now = datetime.now(UTC)
    headers = {c.H_MEMBER_ID: member_id}
    out = []
    for i in range(n):
        payload = {
            "event": "ONCRMDEALUPDATE",
            "data": {"FIELDS": {"ID": deal(i)}},
            "auth": {"member_id": member_id},
        }
        body = json.dumps(payload).encode()
        out.append(Envelope(uuid.uuid4().hex, "ONCRMDEALUPDATE", body, headers, now, "ONX"))
    return out


def flood() -> list[Envelope]:
    return envelopes("flood".ljust(32, "0"), FLOOD, lambda i: str(i % FLOOD_DEALS))


def quiet_events(member: str, n: int) -> list[Envelope]:
    return envelopes(member, n, lambda i: uuid.uuid4().hex[:8])


def modes() -> Iterator[tuple[str, Any, Any]]:
    from b24queue.ordering import Ordering, path_reader
    from b24queue.queues import Fairness

    read = path_reader("data.FIELDS.ID")
    for fair in (True, False):
        label = "fair" if fair else "first in, first out"
        yield f"{label}, no order", Fairness(on=fair), None
        yield f"{label}, strict", Fairness(on=fair), Ordering(read, True, "B")
        yield f"{label}, lenient", Fairness(on=fair), Ordering(read, False, "B")


def sqlite_claims() -> None:
    for label, fairness, ordering in modes():
        with tempfile.TemporaryDirectory() as tmp:
            times, first = sqlite_claim_times(Path(tmp) / "q.sqlite3", fairness, ordering)
        keyed = f"; keying the backlog: {len(first)} claims, {sum(first):.2f} s" if first else ""
        print(f"sqlite claim, {label}: {figures(times)}{keyed}")


def sqlite_claim_times(path: Path, fairness: Any, ordering: Any) -> tuple[list[float], list[float]]:
    from b24queue.transports.sqlite import queue as q
    from b24queue.transports.sqlite.db import connect

    db = connect(path)

    def tx(op: Callable[[sqlite3.Connection], Any]) -> Any:
        with db:
            db.execute("BEGIN IMMEDIATE")
            return op(db)

    def fill(d: sqlite3.Connection) -> None:
        q.declare(d, "w", "w.dlq", ("#",))
        q.publish(d, flood(), "un")
        for i in range(QUIET):
            q.publish(d, quiet_events(quiet(i), 5), "un")

    def claim(n: int) -> Any:
        return tx(lambda d: q.claim(d, "w", "o", n, 60, fairness, ordering))

    tx(fill)
    first: list[float] = []
    unkeyed = "SELECT 1 FROM messages WHERE order_key IS NULL LIMIT 1"
    while ordering is not None and db.execute(unkeyed).fetchone():
        t0 = time.perf_counter()
        claim(1)
        first.append(time.perf_counter() - t0)
        tx(lambda d: q.release(d, "o"))
    held = claim(IN_FLIGHT)
    times = []
    for _ in range(CLAIMS):
        t0 = time.perf_counter()
        rows = claim(1)
        times.append(time.perf_counter() - t0)
        held += rows
        done = held.pop(0)
        member = str(done.headers[c.H_MEMBER_ID])
        tx(lambda d, r=done, m=member: (q.ack(d, r, "o"), _refill(d, m)))
    db.close()
    return times, first


def _refill(db: sqlite3.Connection, member: str) -> None:
    from b24queue.transports.sqlite import queue as q

    if member.startswith("quiet"):
        q.publish(db, quiet_events(member, 1), "un")


async def pg_claims() -> None:
    import asyncpg

    from b24queue.transports.postgres.db import ensure_schema
    from b24queue.transports.postgres.queue import Queries

    for label, fairness, ordering in modes():
        schema = f"ordbench{uuid.uuid4().hex[:8]}"
        db = await asyncpg.connect(PG_URL)
        try:
            await ensure_schema(db, schema)
            q = Queries(schema)
            await q.declare(db, "w", "w.dlq", ("#",))
            await q.declare_unrouted(db, "un")
            events = flood()
            for i in range(0, FLOOD, 1000):
                await q.publish(db, events[i : i + 1000], "un")
            for i in range(QUIET):
                await q.publish(db, quiet_events(quiet(i), 5), "un")
            await db.execute(f'ANALYZE "{schema}".messages')
            unkeyed = f'SELECT 1 FROM "{schema}".messages WHERE order_key IS NULL LIMIT 1'
            first: list[float] = []
            while ordering is not None and await db.fetchval(unkeyed):
                t0 = time.perf_counter()
                await q.claim(db, "w", "o", 1, 60, fairness, ordering)
                first.append(time.perf_counter() - t0)
                await q.release(db, "o")
            held = await q.claim(db, "w", "o", IN_FLIGHT, 60, fairness, ordering)
            times = []
            for _ in range(CLAIMS):
                t0 = time.perf_counter()
                rows = await q.claim(db, "w", "o", 1, 60, fairness, ordering)
                times.append(time.perf_counter() - t0)
                held += rows
                done = held.pop(0)
                await q.ack(db, [(done, "o")])
                member = str(done.headers[c.H_MEMBER_ID])
                if member.startswith("quiet"):
                    await q.publish(db, quiet_events(member, 1), "un")
        finally:
            await db.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await db.close()
        keyed = f"; keying the backlog: {len(first)} claims, {sum(first):.2f} s" if first else ""
        print(f"postgres claim, {label}: {figures(times)}{keyed}")


if __name__ == "__main__":
    sqlite_claims()
    asyncio.run(pg_claims())
