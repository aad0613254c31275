"""The queue operations, as functions of one SQLite connection (run inside a transaction by
`db.Database.write`): publish with routing, claim with a lease, settle, and the operator's view.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from b24queue import _constants as c
from b24queue.events.envelope import Envelope
from b24queue.queues import Fairness, portal_key, topic_matches
from b24queue.transports.kit import tables
from b24queue.transports.kit.fair import Claim
from b24queue.transports.kit.leased import Row
from b24queue.transports.kit.tables import CONSUMER, DLQ, UNROUTED, Depth, Overview
from b24queue.transports.kit.unrouted import UnroutedCap
from b24queue.transports.status import PortalsWaiting

_MESSAGE = "id, message_id, routing_key, body, headers, timestamp, event_type, deliveries, fence"


def _row(values: tuple[Any, ...]) -> Row:
    return Row(
        values[0],
        values[1],
        values[2],
        bytes(values[3]),
        json.loads(values[4]),
        datetime.fromisoformat(values[5]),
        values[6],
        values[7],
        values[8],
    )


def publish(
    db: sqlite3.Connection,
    envelopes: Iterable[Envelope],
    unrouted: str,
    cap: UnroutedCap | None = None,
) -> tuple[int, int]:
    """One row per bound queue for each event, or one in the unrouted queue (inside the caller's
    transaction); past the `cap`, the unrouted queue's oldest go in the same transaction.
    Returns what went: (events, bytes)."""
    bindings = db.execute("SELECT queue, pattern FROM bindings").fetchall()
    now = time.time()
    rows = []
    unbound = []
    for e in envelopes:
        queues = sorted({q for q, p in bindings if topic_matches(p, e.routing_key)}) or [unrouted]
        if queues == [unrouted]:
            unbound.append(len(e.body))
        stored = e.stored()
        portal = portal_key(e.headers.get(c.H_MEMBER_ID))
        rows += [(q, *stored, now, portal) for q in queues]
    db.executemany(
        "INSERT INTO messages (queue, message_id, routing_key, body, headers, timestamp, "
        "event_type, available_at, portal) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    if not unbound:
        return 0, 0
    held = db.execute(
        "UPDATE queue_sizes SET events = events + ?, bytes = bytes + ? WHERE queue = ? "
        "RETURNING events, bytes",
        (len(unbound), sum(unbound), unrouted),
    ).fetchone()
    if held is None or cap is None or not cap.over(*held):
        return 0, 0
    return _drop_oldest(db, unrouted, held[0], held[1], cap)


def _drop_oldest(
    db: sqlite3.Connection, queue: str, events: int, size: int, cap: UnroutedCap
) -> tuple[int, int]:
    """The queue's oldest rows, until it is within the cap (its ledger says how far over it is:
    each dropped row is read once, never the whole queue)."""
    dropped = freed = 0
    while cap.over(events, size):
        oldest = db.execute(
            "SELECT id, length(body) FROM messages WHERE queue = ? ORDER BY available_at, id "
            "LIMIT 100",
            (queue,),
        ).fetchall()
        if not oldest:  # the ledger was ahead of the rows: the queue is empty
            events = size = 0
            break
        drop = cap.oldest_to_drop(oldest, events, size)
        db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i, _ in drop])
        gone = sum(n for _, n in drop)
        events, size = events - len(drop), size - gone
        dropped, freed = dropped + len(drop), freed + gone
    db.execute(
        "UPDATE queue_sizes SET events = ?, bytes = ? WHERE queue = ?", (events, size, queue)
    )
    return dropped, freed


def _shrank(db: sqlite3.Connection, queue: str, sizes: list[int]) -> None:
    """Rows of `queue` deleted by an operator (replayed, purged): its ledger, if it has one."""
    if sizes:
        db.execute(
            "UPDATE queue_sizes SET events = max(0, events - ?), bytes = max(0, bytes - ?) "
            "WHERE queue = ?",
            (len(sizes), sum(sizes), queue),
        )


def due(db: sqlite3.Connection, queue: str) -> bool:
    """Is anything ready to be claimed (a read: idle workers poll with this, not a write)?"""
    now = time.time()
    row = db.execute(
        "SELECT 1 FROM messages WHERE queue = ? AND available_at <= ? "
        "AND (lease_until IS NULL OR lease_until < ?) LIMIT 1",
        (queue, now, now),
    ).fetchone()
    return row is not None


def claim(
    db: sqlite3.Connection,
    queue: str,
    owner: str,
    count: int,
    lease_s: float,
    fairness: Fairness | None = None,
) -> list[Row]:
    """Lease up to `count` due messages (an expired lease counts as free): in turns among the
    portals with `fairness.on` (`claim_fair`), else in due order.

    Due order is `available_at`, then `id`: the order of `messages_due`, so the claim walks that
    index from the queue's first row and stops after `count` free ones, passing only the rows
    being handled (they keep their place until settled) and never reaching those waiting for a
    retry. Its time under the write lock does not grow with the backlog (ordered by `id` alone,
    it read and sorted every due row each time). A retried event is due again behind those that
    arrived before its delay ended, as on RabbitMQ and PostgreSQL."""
    if fairness is not None and fairness.on:
        return claim_fair(db, queue, owner, count, lease_s, fairness)
    now = time.time()
    sql = (
        "UPDATE messages SET lease_owner = ?, lease_until = ?, deliveries = deliveries + 1, "
        "fence = fence + 1 "
        "WHERE id IN (SELECT id FROM messages WHERE queue = ? AND available_at <= ? "
        "AND (lease_until IS NULL OR lease_until < ?) ORDER BY available_at, id LIMIT ?) "
        "RETURNING id, message_id, routing_key, body, headers, timestamp, event_type, deliveries, "
        "fence"
    )
    rows = db.execute(sql, (owner, now + lease_s, queue, now, now, count)).fetchall()
    return sorted((_row(r) for r in rows), key=lambda r: r.id)


# The portals with rows in a queue, one probe of `messages_portal` each (a loose index scan):
# a portal's backlog is never read for it.
_PORTALS = """
    WITH RECURSIVE p(portal) AS (
        SELECT (SELECT portal FROM messages WHERE queue = ?1 ORDER BY portal LIMIT 1)
        UNION ALL
        SELECT (SELECT m.portal FROM messages m WHERE m.queue = ?1 AND m.portal > p.portal
            ORDER BY m.portal LIMIT 1) FROM p WHERE p.portal IS NOT NULL
    ) SELECT portal FROM p WHERE portal IS NOT NULL
"""
# Of those, the portals with a due, free row (one more probe each, on `messages_portal`: past the
# few rows in handlers, short of those waiting for a retry): only they take part in a claim's
# turns (a portal whose rows all wait for a retry would win a slot, read nothing, and be asked
# again, a claim's rounds growing with such portals).
_DUE_PORTALS = (
    f"SELECT portal FROM ({_PORTALS}) AS p WHERE EXISTS (SELECT 1 FROM messages m INDEXED BY "  # noqa: S608
    "messages_portal WHERE m.queue = ?1 AND m.portal = p.portal AND m.available_at <= ?2 "
    "AND (m.lease_until IS NULL OR m.lease_until < ?2))"
)
# A queue's rows in handlers now, by portal, across workers.
_LEASED_BY_PORTAL = (
    "SELECT portal, count(*) FROM messages INDEXED BY messages_leased "
    "WHERE lease_owner IS NOT NULL AND queue = ? AND lease_until >= ? GROUP BY portal"
)
# A portal's oldest due, free rows: those being handled (few) are passed, those waiting for a
# retry are past the range read.
_PORTAL_DUE = (
    "SELECT id FROM messages INDEXED BY messages_portal WHERE queue = ? AND portal = ? "
    "AND available_at <= ? AND (lease_until IS NULL OR lease_until < ?) "
    "ORDER BY available_at, id LIMIT ?"
)
_LEASE = (
    "UPDATE messages SET lease_owner = ?, lease_until = ?, deliveries = deliveries + 1, "  # noqa: S608
    f"fence = fence + 1 WHERE id IN ({{}}) RETURNING {_MESSAGE}"
)


def claim_fair(
    db: sqlite3.Connection, queue: str, owner: str, count: int, lease_s: float, fairness: Fairness
) -> list[Row]:
    """Lease up to `count` due messages, in turns among the portals (b24queue.transports.kit.fair):
    the turns are read and written in this transaction, which every process's claims of the
    queue take in turn (the database's one writer). Reads two index probes per portal with rows
    in the queue, and the rows of the portals given a slot: not the backlog."""
    now = time.time()
    portals = [p for (p,) in db.execute(_DUE_PORTALS, (queue, now))]
    if not portals:
        return []
    found = db.execute("SELECT clock FROM queue_clocks WHERE queue = ?", (queue,)).fetchone()
    clock = float(found[0]) if found else 0.0
    passes = dict(db.execute("SELECT portal, pass FROM portal_turns WHERE queue = ?", (queue,)))
    leased: dict[str, int] = {}
    if fairness.cap is not None:  # the rows in handlers now, by portal, across workers
        leased = dict(db.execute(_LEASED_BY_PORTAL, (queue, now)))
    plan = Claim(count, portals, passes, clock, fairness, leased)
    while wanted := plan.wanted():
        for portal, n in wanted.items():
            ids = [i for (i,) in db.execute(_PORTAL_DUE, (queue, portal, now, now, n))]
            plan.found(portal, ids, n)
    ids = plan.ids()
    if not ids:
        return []
    rows = db.execute(
        _LEASE.format(",".join("?" * len(ids))), (owner, now + lease_s, *ids)
    ).fetchall()
    turns = plan.turns
    db.executemany(
        "INSERT INTO portal_turns VALUES (?, ?, ?) "
        "ON CONFLICT (queue, portal) DO UPDATE SET pass = excluded.pass",
        [(queue, p, v) for p, v in turns.passes.items()],
    )
    db.execute(
        "INSERT INTO queue_clocks VALUES (?, ?) ON CONFLICT (queue) DO UPDATE SET clock = ?",
        (queue, turns.clock, turns.clock),
    )
    # A pass the clock has reached says no more than none: the portal starts at the clock.
    db.execute("DELETE FROM portal_turns WHERE queue = ? AND pass <= ?", (queue, turns.clock))
    return sorted((_row(r) for r in rows), key=lambda r: r.id)


def ack(db: sqlite3.Connection, row: Row, owner: str) -> bool:
    """Only while this claim still holds the row (`fence` tells an older one)."""
    cursor = db.execute(
        "DELETE FROM messages WHERE id = ? AND lease_owner = ? AND fence = ?",
        (row.id, owner, row.fence),
    )
    return cursor.rowcount == 1


def move(
    db: sqlite3.Connection,
    row: Row,
    owner: str,
    *,
    queue: str,
    headers: dict[str, Any],
    delay_s: float = 0.0,
) -> bool:
    """Retry (the same queue, later) or dead-letter (its `.dlq`, at the end of it: a DLQ is in the
    order things failed), only while this delivery holds the lease; in the caller's transaction,
    so there is no moment with the message in two places or none."""
    fence = (row.id, owner, row.fence)
    encoded = json.dumps(headers, default=str)
    if queue.endswith(".dlq"):
        copied = db.execute(
            "INSERT INTO messages (queue, message_id, routing_key, body, headers, timestamp, "
            "event_type, available_at, portal) SELECT ?, message_id, routing_key, body, ?, "
            "timestamp, event_type, ?, portal FROM messages "
            "WHERE id = ? AND lease_owner = ? AND fence = ?",
            (queue, encoded, time.time(), *fence),
        ).rowcount
        if copied != 1:
            return False
        db.execute("DELETE FROM messages WHERE id = ?", (row.id,))
        return True
    cursor = db.execute(
        "UPDATE messages SET headers = ?, available_at = ?, lease_owner = NULL, "
        "lease_until = NULL, deliveries = 0 WHERE id = ? AND lease_owner = ? AND fence = ?",
        (encoded, time.time() + delay_s, *fence),
    )
    return cursor.rowcount == 1


def renew(db: sqlite3.Connection, owner: str, ids: list[int], lease_s: float) -> int:
    """Extend the leases of the rows this worker is still handling (each heartbeat); give back
    any other row it holds (a claim it never saw the answer of)."""
    marks = ",".join("?" * len(ids))
    db.execute(
        f"UPDATE messages SET lease_owner = NULL, lease_until = NULL "  # noqa: S608
        f"WHERE lease_owner = ? AND id NOT IN ({marks})",
        (owner, *ids),
    )
    if not ids:
        return 0
    return db.execute(
        f"UPDATE messages SET lease_until = ? WHERE lease_owner = ? AND id IN ({marks})",  # noqa: S608
        (time.time() + lease_s, owner, *ids),
    ).rowcount


def release(db: sqlite3.Connection, owner: str) -> int:
    """Give back what `owner` holds (a stopping worker's cancelled handlers): redelivered now."""
    return db.execute(
        "UPDATE messages SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
        (owner,),
    ).rowcount


def heartbeat(db: sqlite3.Connection, owner: str, queue: str, name: str) -> None:
    db.execute(
        "INSERT INTO workers (owner, queue, name, seen_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(owner) DO UPDATE SET seen_at = excluded.seen_at",
        (owner, queue, name, time.time()),
    )


def leave(db: sqlite3.Connection, owner: str) -> int:
    return db.execute("DELETE FROM workers WHERE owner = ?", (owner,)).rowcount


def declare(
    db: sqlite3.Connection, queue: str, dlq: str, patterns: tuple[str, ...]
) -> tuple[list[str], list[str]]:
    """The consumer queue and its DLQ exist, and its bindings are exactly `patterns`.
    Returns (added, removed) bindings."""
    db.execute("INSERT OR IGNORE INTO queues VALUES (?, ?)", (queue, CONSUMER))
    db.execute("INSERT OR IGNORE INTO queues VALUES (?, ?)", (dlq, DLQ))
    current = {p for (p,) in db.execute("SELECT pattern FROM bindings WHERE queue = ?", (queue,))}
    added = [p for p in patterns if p not in current]
    removed = sorted(current - set(patterns))
    db.executemany("INSERT INTO bindings VALUES (?, ?)", [(queue, p) for p in added])
    db.executemany(
        "DELETE FROM bindings WHERE queue = ? AND pattern = ?", [(queue, p) for p in removed]
    )
    return added, removed


def declare_unrouted(db: sqlite3.Connection, unrouted: str) -> None:
    """The unrouted queue, and its ledger (counted once, when it has none yet)."""
    db.execute("INSERT OR IGNORE INTO queues VALUES (?, ?)", (unrouted, UNROUTED))
    if db.execute("SELECT 1 FROM queue_sizes WHERE queue = ?", (unrouted,)).fetchone() is None:
        db.execute(
            "INSERT INTO queue_sizes SELECT ?, count(*), coalesce(sum(length(body)), 0) "
            "FROM messages WHERE queue = ?",
            (unrouted, unrouted),
        )


def first(db: sqlite3.Connection, queue: str, limit: int, after: int = -1) -> list[Row]:
    """Messages of a queue in order, from after id `after` (to read a large queue in pieces)."""
    return [
        _row(r)
        for r in db.execute(
            f"SELECT {_MESSAGE} FROM messages WHERE queue = ? AND id > ? ORDER BY id LIMIT ?",  # noqa: S608
            (queue, after, limit),
        )
    ]


WriteOp = Callable[[sqlite3.Connection], Any]


def exists(db: sqlite3.Connection, queue: str) -> bool:
    return db.execute("SELECT 1 FROM queues WHERE name = ?", (queue,)).fetchone() is not None


def depths(db: sqlite3.Connection) -> dict[str, int]:
    return dict(db.execute("SELECT queue, count(*) FROM messages GROUP BY queue").fetchall())


def depth(db: sqlite3.Connection, queue: str) -> int:
    """One queue's messages (its range of `messages_due`, not every queue's)."""
    return int(db.execute("SELECT count(*) FROM messages WHERE queue = ?", (queue,)).fetchone()[0])


def overview(db: sqlite3.Connection, alive_since: float) -> Overview:
    now = time.time()
    queues: dict[str, Depth] = {}
    for queue, ready, leased, later in db.execute(
        "SELECT queue, "
        "sum(lease_until IS NULL OR lease_until < ?) - sum((lease_until IS NULL OR lease_until < ?)"
        " AND available_at > ?), "
        "sum(lease_until IS NOT NULL AND lease_until >= ?), "
        "sum((lease_until IS NULL OR lease_until < ?) AND available_at > ?) "
        "FROM messages GROUP BY queue",
        (now, now, now, now, now, now),
    ):
        queues[queue] = Depth(int(ready or 0), int(leased or 0), int(later or 0))
    consumer_queues = [
        name for (name,) in db.execute("SELECT name FROM queues WHERE kind = ?", (CONSUMER,))
    ]
    live = db.execute(
        "SELECT queue, name FROM workers WHERE seen_at >= ?", (alive_since,)
    ).fetchall()
    workers: dict[str, int] = {}
    for queue, _ in live:
        workers[queue] = workers.get(queue, 0) + 1
    found = {name: portals(db, name, now) for name in consumer_queues}
    return Overview(consumer_queues, queues, workers, sorted({name for _, name in live}), found)


def portals(db: sqlite3.Connection, queue: str, now: float) -> PortalsWaiting:
    """`status`'s portals of a queue, within the bounds of `kit.tables`: the portals by a loose
    scan, each one's rows counted on the portal index (it covers the count) up to a bound past
    its rows in handlers now (few: counted apart)."""
    leased = dict(db.execute(_LEASED_BY_PORTAL, (queue, now)))
    read = [p for (p,) in db.execute(_PORTALS + " LIMIT ?2", (queue, tables.PORTALS_READ + 1))]
    counted = [
        (
            p,
            db.execute(
                _PORTAL_ROWS, (queue, p, leased.get(p, 0) + tables.PORTAL_EVENTS_READ + 1)
            ).fetchone()[0],
        )
        for p in read[: tables.PORTALS_READ]
    ]
    return tables.portals_waiting(counted, leased, len(read) <= tables.PORTALS_READ)


_PORTAL_ROWS = (
    "SELECT count(*) FROM (SELECT 1 FROM messages INDEXED BY messages_portal "
    "WHERE queue = ? AND portal = ? LIMIT ?)"
)


def replay(
    db: sqlite3.Connection,
    row: Row,
    headers: dict[str, Any],
    back_to: str | None,
    unrouted: str,
    source: str,
) -> bool:
    """A dead letter back to its queue, or an unrouted event to the queues bound to it now, in
    the caller's transaction. False (nothing changed) when the row is no longer in `source`, or an
    unrouted event is still bound by no queue."""
    if back_to is not None:
        return (
            db.execute(
                "UPDATE messages SET queue = ?, headers = ?, available_at = ?, "
                "lease_owner = NULL, lease_until = NULL, deliveries = 0 "
                "WHERE id = ? AND queue = ?",
                (back_to, json.dumps(headers, default=str), time.time(), row.id, source),
            ).rowcount
            == 1
        )
    bindings = db.execute("SELECT queue, pattern FROM bindings").fetchall()
    if not any(topic_matches(p, row.routing_key) for _, p in bindings):
        return False
    gone = db.execute(
        "DELETE FROM messages WHERE id = ? AND queue = ? RETURNING length(body)", (row.id, source)
    ).fetchall()
    if not gone:
        return False
    _shrank(db, source, [n for (n,) in gone])
    publish(db, [row.envelope(headers)], unrouted)
    return True


def purge(db: sqlite3.Connection, queue: str, count: int) -> int:
    """The first `count` messages of the queue, for good."""
    gone = db.execute(
        "DELETE FROM messages WHERE id IN "
        "(SELECT id FROM messages WHERE queue = ? ORDER BY id LIMIT ?) RETURNING length(body)",
        (queue, count),
    ).fetchall()
    _shrank(db, queue, [n for (n,) in gone])
    return len(gone)
