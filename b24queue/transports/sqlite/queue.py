"""The queue operations, as functions of one SQLite connection (run inside a transaction by
`db.Database.write`): publish with routing, claim with a lease, settle, and the operator's view.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any

from b24queue import _constants as c
from b24queue.events.envelope import Envelope
from b24queue.ordering import Ordering
from b24queue.queues import Fairness, portal_key, topic_matches
from b24queue.transports.kit.leased import Row
from b24queue.transports.kit.tables import CONSUMER, DLQ, UNROUTED, Depth, Overview
from b24queue.transports.kit.unrouted import UnroutedCap
from b24queue.transports.sqlite import claims
from b24queue.transports.sqlite.claims import MESSAGE, row_of


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


def due(db: sqlite3.Connection, queue: str, ordering: Ordering | None = None) -> bool:
    """Is anything ready to be claimed (a read: idle workers poll with this, not a write)? Under
    an order, a row its order holds back is not (a key held by a retry would have every idle
    worker take the write lock at each poll for nothing); one not keyed yet is."""
    now = time.time()
    free = claims.ordered_free(ordering, unkeyed=1)
    row = db.execute(
        "SELECT 1 FROM messages m WHERE queue = ?1 AND available_at <= ?4 "  # noqa: S608
        f"AND (lease_until IS NULL OR lease_until < ?4) {free} LIMIT 1",
        (queue, None, None, now),
    ).fetchone()
    return row is not None


def due_among(db: sqlite3.Connection, queues: dict[str, Ordering | None]) -> list[str]:
    """Of `queues`, those with something to claim (`due`): the unordered ones in one statement
    (a probe of `messages_due` each), the ordered ones each by `due`. What a worker process's
    watch reads for all its runners at once (b24queue.transports.sqlite.runner)."""
    plain = [name for name, ordering in queues.items() if ordering is None or not ordering.on]
    found: list[str] = []
    if plain:
        found += [
            name
            for (name,) in db.execute(
                "SELECT value FROM json_each(?1) AS q WHERE EXISTS (SELECT 1 FROM messages m "
                "WHERE m.queue = q.value AND m.available_at <= ?2 "
                "AND (m.lease_until IS NULL OR m.lease_until < ?2))",
                (json.dumps(plain), time.time()),
            )
        ]
    ordered = {name: o for name, o in queues.items() if o is not None and o.on}
    return found + [name for name, o in ordered.items() if due(db, name, o)]


def claim(
    db: sqlite3.Connection,
    queue: str,
    owner: str,
    count: int,
    lease_s: float,
    fairness: Fairness | None = None,
    ordering: Ordering | None = None,
) -> list[Row]:
    """Lease up to `count` due messages (an expired lease counts as free): in turns among the
    portals with `fairness.on`, else in due order; with `ordering.on`, no two of one portal and
    key in handlers at once, in the order they were accepted (b24queue.transports.sqlite.claims).

    Due order is `available_at`, then `id`: the order of `messages_due`, so the claim walks that
    index from the queue's first row and stops after `count` free ones, passing only the rows
    being handled (they keep their place until settled) and never reaching those waiting for a
    retry. Its time under the write lock does not grow with the backlog (ordered by `id` alone,
    it read and sorted every due row each time). A retried event is due again behind those that
    arrived before its delay ended, as on RabbitMQ and PostgreSQL."""
    if ordering is not None and ordering.on:
        claims.stamp(db, queue, ordering)
    if fairness is not None and fairness.on:
        taken = claims.claim_fair(db, queue, owner, count, lease_s, fairness, ordering)
    else:
        taken = _claim_in_order(db, queue, owner, count, lease_s, ordering)
    if ordering is not None and ordering.coalesce:
        return claims.coalesced(db, taken, owner, lease_s)
    return taken


def _claim_in_order(
    db: sqlite3.Connection,
    queue: str,
    owner: str,
    count: int,
    lease_s: float,
    ordering: Ordering | None,
) -> list[Row]:
    now = time.time()
    free = claims.ordered_free(ordering)
    sql = (
        "UPDATE messages SET lease_owner = ?1, lease_until = ?2, deliveries = deliveries + 1, "  # noqa: S608
        "fence = fence + 1 "
        "WHERE id IN (SELECT id FROM messages m WHERE queue = ?3 AND available_at <= ?4 "
        f"AND (lease_until IS NULL OR lease_until < ?4) {free} ORDER BY available_at, id "
        f"LIMIT ?5) RETURNING {MESSAGE}"
    )
    rows = db.execute(sql, (owner, now + lease_s, queue, now, count)).fetchall()
    return sorted((row_of(r) for r in rows), key=lambda r: r.id)


def ack(db: sqlite3.Connection, row: Row, owner: str) -> bool:
    """Only while this claim still holds the row (`fence` tells an older one); with the rows
    coalesced into it (`Row.replaced`), each likewise."""
    cursor = db.execute(
        "DELETE FROM messages WHERE id = ? AND lease_owner = ? AND fence = ?",
        (row.id, owner, row.fence),
    )
    if cursor.rowcount != 1:
        return False
    db.executemany(
        "DELETE FROM messages WHERE id = ? AND lease_owner = ? AND fence = ?",
        [(r.id, owner, r.fence) for r in row.replaced],
    )
    return True


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
    so there is no moment with the message in two places or none. The rows coalesced into it go
    the same way first, oldest first (a retry keeps their headers; a dead letter gets its error)."""
    if row.replaced:
        held = db.execute(
            "SELECT 1 FROM messages WHERE id = ? AND lease_owner = ? AND fence = ?",
            (row.id, owner, row.fence),
        ).fetchone()
        if held is None:
            return False
        dead = queue.endswith(".dlq")
        for r in row.replaced:
            own = {**r.headers, **headers} if dead else r.headers
            _move_one(db, r, owner, queue, own, delay_s)
    return _move_one(db, row, owner, queue, headers, delay_s)


def _move_one(
    db: sqlite3.Connection,
    row: Row,
    owner: str,
    queue: str,
    headers: dict[str, Any],
    delay_s: float,
) -> bool:
    fence = (row.id, owner, row.fence)
    encoded = json.dumps(headers, default=str)
    if queue.endswith(".dlq"):
        copied = db.execute(
            "INSERT INTO messages (queue, message_id, routing_key, body, headers, timestamp, "
            "event_type, available_at, portal, order_key) SELECT ?, message_id, routing_key, "
            "body, ?, timestamp, event_type, ?, portal, order_key FROM messages "
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
        row_of(r)
        for r in db.execute(
            f"SELECT {MESSAGE} FROM messages WHERE queue = ? AND id > ? ORDER BY id LIMIT ?",  # noqa: S608
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
    found = {name: claims.portals(db, name, now) for name in consumer_queues}
    return Overview(consumer_queues, queues, workers, sorted({name for _, name in live}), found)


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
