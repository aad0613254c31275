"""What a claim reads beyond due order, as functions of one SQLite connection (inside the claim's
transaction): turns among the portals (`claim_fair`, b24queue.transports.kit.fair), order within
an entity (`stamp`, `ordered_free`; b24queue.ordering), and `status`'s portals, which the fair
claim's portal scan also gives.
"""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime
from typing import Any

from b24queue.ordering import MAX_COALESCED, Ordering
from b24queue.queues import Fairness
from b24queue.transports.kit import tables
from b24queue.transports.kit.fair import Claim
from b24queue.transports.kit.leased import Row
from b24queue.transports.kit.leased import coalesced as coalesced_row
from b24queue.transports.status import PortalsWaiting

MESSAGE = "id, message_id, routing_key, body, headers, timestamp, event_type, deliveries, fence"
# Rows an ordered claim keys at most (in the order accepted; a claim takes only keyed rows): what
# arrived since the last claim, but for a backlog that arrived at once (keyed over a few claims).
STAMP_BATCH = 1000


def row_of(values: tuple[Any, ...]) -> Row:
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


def stamp(db: sqlite3.Connection, queue: str, ordering: Ordering) -> int:
    """Key the queue's rows no claim has keyed yet (`order_key` NULL), the first accepted first,
    up to `STAMP_BATCH`: `messages_order` holds them together, in id order. Returns how many."""
    rows = db.execute(
        "SELECT id, portal, body FROM messages INDEXED BY messages_order "
        "WHERE queue = ? AND order_key IS NULL ORDER BY id LIMIT ?",
        (queue, STAMP_BATCH),
    ).fetchall()
    db.executemany(
        "UPDATE messages SET order_key = ? WHERE id = ?",
        [(ordering.group(portal, bytes(body)), i) for i, portal, body in rows],
    )
    return len(rows)


def ordered_free(ordering: Ordering | None, unkeyed: int = 0) -> str:
    """The condition (on `messages m`; ?4 is now) that a due, free row may be claimed under
    `ordering`: it is keyed, and no row of its group is in a handler, nor (strict) accepted before
    it, nor (lenient) accepted before it and due. A row waiting for a retry holds its group's later
    rows under the strict rule only; a dead letter has left the queue and holds none. "" when
    `ordering` is off. `unkeyed` 1: a row not keyed yet counts (`queue.due`: a claim keys it)."""
    if ordering is None or not ordering.on:
        return ""
    earlier = "o.id < m.id" if ordering.strict else "(o.id < m.id AND o.available_at <= ?4)"
    # A CASE, as on PostgreSQL: no planner takes it for a range of `messages_order`.
    return (
        f"AND CASE WHEN m.order_key IS NULL THEN {int(unkeyed)} WHEN m.order_key = '' THEN 1 "  # noqa: S608
        "ELSE NOT EXISTS (SELECT 1 FROM messages o INDEXED BY messages_order "
        "WHERE o.queue = m.queue AND o.order_key = m.order_key AND o.id <> m.id "
        f"AND (o.lease_until >= ?4 OR {earlier})) END"
    )


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
# again, a claim's rounds growing with such portals). With an order, a row its order holds back
# is not free. ?4 is now.
_DUE_PORTALS = (
    f"SELECT portal FROM ({_PORTALS}) AS p WHERE EXISTS (SELECT 1 FROM messages m "  # noqa: S608
    "INDEXED BY messages_portal WHERE m.queue = ?1 AND m.portal = p.portal "
    "AND m.available_at <= ?4 AND (m.lease_until IS NULL OR m.lease_until < ?4) {})"
)
# A queue's rows in handlers now, by portal, across workers.
_LEASED_BY_PORTAL = (
    "SELECT portal, count(*) FROM messages INDEXED BY messages_leased "
    "WHERE lease_owner IS NOT NULL AND queue = ? AND lease_until >= ? GROUP BY portal"
)
# A portal's oldest due, free rows: those being handled (few) are passed, those waiting for a
# retry are past the range read. ?4 now.
_PORTAL_DUE = (
    "SELECT id FROM messages m INDEXED BY messages_portal WHERE queue = ?1 AND portal = ?2 "
    "AND available_at <= ?4 AND (lease_until IS NULL OR lease_until < ?4) {} "
    "ORDER BY available_at, id LIMIT ?3"
)
_LEASE = (
    "UPDATE messages SET lease_owner = ?, lease_until = ?, deliveries = deliveries + 1, "  # noqa: S608
    f"fence = fence + 1 WHERE id IN ({{}}) RETURNING {MESSAGE}"
)


def claim_fair(
    db: sqlite3.Connection,
    queue: str,
    owner: str,
    count: int,
    lease_s: float,
    fairness: Fairness,
    ordering: Ordering | None = None,
) -> list[Row]:
    """Lease up to `count` due messages, in turns among the portals (b24queue.transports.kit.fair):
    the turns are read and written in this transaction, which every process's claims of the
    queue take in turn (the database's one writer). Reads two index probes per portal with rows
    in the queue, and the rows of the portals given a slot: not the backlog."""
    now = time.time()
    free = ordered_free(ordering)
    portals = [p for (p,) in db.execute(_DUE_PORTALS.format(free), (queue, None, None, now))]
    if not portals:
        return []
    found = db.execute("SELECT clock FROM queue_clocks WHERE queue = ?", (queue,)).fetchone()
    clock = float(found[0]) if found else 0.0
    passes = dict(db.execute("SELECT portal, pass FROM portal_turns WHERE queue = ?", (queue,)))
    leased: dict[str, int] = {}
    if fairness.cap is not None:  # the rows in handlers now, by portal, across workers
        leased = dict(db.execute(_LEASED_BY_PORTAL, (queue, now)))
    plan = Claim(count, portals, passes, clock, fairness, leased)
    due = _PORTAL_DUE.format(free)
    while wanted := plan.wanted():
        for portal, n in wanted.items():
            ids = [i for (i,) in db.execute(due, (queue, portal, n, now))]
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
    return sorted((row_of(r) for r in rows), key=lambda r: r.id)


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


# Coalescing: the later rows of a claimed row's group that are due and free, in the order
# accepted, up to the first one that is not due (a later row waiting for its retry: those past it
# stay for the order to keep). ?3 the claimed row, ?4 now, ?5 at most.
_COALESCE = (
    "UPDATE messages SET lease_owner = ?1, lease_until = ?2, deliveries = deliveries + 1, "  # noqa: S608
    "fence = fence + 1 WHERE id IN (SELECT o.id FROM messages m "
    "JOIN messages o INDEXED BY messages_order ON o.queue = m.queue AND o.order_key = m.order_key "
    "WHERE m.id = ?3 AND m.order_key <> '' AND o.id > m.id AND o.available_at <= ?4 "
    "AND (o.lease_until IS NULL OR o.lease_until < ?4) AND NOT EXISTS (SELECT 1 FROM messages p "
    "INDEXED BY messages_order WHERE p.queue = m.queue AND p.order_key = m.order_key "
    "AND p.id > m.id AND p.id < o.id AND p.available_at > ?4) ORDER BY o.id LIMIT ?5) "
    f"RETURNING {MESSAGE}"
)


def coalesced(db: sqlite3.Connection, rows: list[Row], owner: str, lease_s: float) -> list[Row]:
    """Each claimed row with the later rows of its group waiting leased with it
    (b24queue.ordering.MAX_COALESCED at most): handed over as the latest, the others its
    `replaced`, oldest first."""
    now = time.time()
    out = []
    for row in rows:
        later = db.execute(_COALESCE, (owner, now + lease_s, row.id, now, MAX_COALESCED)).fetchall()
        if not later:
            out.append(row)
            continue
        out.append(coalesced_row([row, *sorted((row_of(r) for r in later), key=lambda r: r.id)]))
    return out
