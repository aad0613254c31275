"""What a claim reads beyond due order, in PostgreSQL's SQL: turns among the portals
(`claim_fair`, b24queue.transports.kit.fair), order within an entity (`stamp`, `ordered_free`;
b24queue.ordering), and `status`'s portals, which the fair claim's portal scan also gives.

A fair or ordered claim of a queue holds the queue's claim lock (an advisory lock, to the commit):
its reads of the turns, of the rows in handlers and of the groups' order see what the previous
claim wrote, across every worker process. It waits at most `LOCK_WAIT_MS` for that lock (then it
fails, and the worker claims again after its poll: a stuck claim does not hang the others), and
takes its time from the clock once it holds it (`now()` is the transaction's start, before the
wait: a lease would end early by the wait, and rows that came due meanwhile would be passed).
"""

from __future__ import annotations

import json
from datetime import datetime

import asyncpg

from b24queue.ordering import MAX_COALESCED, Ordering
from b24queue.queues import Fairness
from b24queue.transports.kit import tables
from b24queue.transports.kit.fair import Claim
from b24queue.transports.kit.leased import Row
from b24queue.transports.kit.leased import coalesced as coalesced_row
from b24queue.transports.postgres.db import Db
from b24queue.transports.status import PortalsWaiting

COLUMNS = "id, message_id, routing_key, body, headers, stamp, event_type, deliveries, fence"
LOCK_WAIT_MS = 5000
# Rows an ordered claim keys at most (in the order accepted; a claim takes only keyed rows): what
# arrived since the last claim, but for a backlog that arrived at once (keyed over a few claims).
STAMP_BATCH = 1000


def row_of(record: asyncpg.Record) -> Row:
    return Row(
        record["id"],
        record["message_id"],
        record["routing_key"],
        bytes(record["body"]),
        json.loads(record["headers"]),
        record["stamp"],
        record["event_type"],
        record["deliveries"],
        record["fence"],
    )


def ordered_free(ordering: Ordering | None, now: str) -> str:
    """The condition (on `messages m`; `now` the time's parameter) that a due, free row may be
    claimed under `ordering`: it is keyed, and no row of its group is in a handler, nor (strict)
    accepted before it, nor (lenient) accepted before it and due. A row waiting for a retry holds
    its group's later rows under the strict rule only; a dead letter has left the queue and holds
    none. "" when `ordering` is off."""
    if ordering is None or not ordering.on:
        return ""
    earlier = "o.id < m.id" if ordering.strict else f"(o.id < m.id AND o.available_at <= {now})"
    # A CASE, not `order_key IS NOT NULL AND ...`: the planner cannot take it for a range of
    # `messages_order` (right after a burst or an upgrade its statistics say few rows are keyed,
    # and it read the whole queue's keyed rows that way, 75 ms a claim at 20,000).
    return (
        "AND CASE WHEN m.order_key IS NULL THEN false WHEN m.order_key = '' THEN true "
        "ELSE NOT EXISTS (SELECT 1 FROM {s}.messages o WHERE o.queue = m.queue "
        f"AND o.order_key = m.order_key AND o.id <> m.id AND (o.lease_until >= {now} OR {earlier}))"
        " END"
    )


class Claims:
    """The statements for one schema (its name is checked by the settings: a plain identifier)."""

    def __init__(self, schema: str) -> None:
        s = self.s = f'"{schema}"'
        self.lock_name = f"b24queue:{schema}"
        self.lock_wait_ms = LOCK_WAIT_MS
        # The portals with rows in the queue, by a loose scan of `messages_portal` (one probe
        # each, never a portal's backlog), and their rows in handlers now (across workers; with
        # $2 true). {now}: the time.
        portals = f"""
            WITH RECURSIVE p AS (
                (SELECT portal FROM {s}.messages WHERE queue = $1 ORDER BY portal LIMIT 1)
                UNION ALL
                SELECT (SELECT m.portal FROM {s}.messages m WHERE m.queue = $1
                    AND m.portal > p.portal ORDER BY m.portal LIMIT 1)
                FROM p WHERE p.portal IS NOT NULL
            ), leased AS (
                SELECT portal, count(*) AS n FROM {s}.messages
                WHERE lease_owner IS NOT NULL AND queue = $1 AND lease_until >= {{now}} AND $2
                GROUP BY portal
            )"""
        # Fair claims: of those portals, the ones with a due, free row (one more probe each: a
        # portal whose rows all wait for a retry, or its order holds back, takes no part in the
        # turns, else it would win a slot, read nothing and be asked again, round after round),
        # with their passes, their rows in handlers and the queue's clock. $3: the time.
        self._portals_sql = (
            portals.format(now="$3")
            + f"""
            SELECT p.portal, t.pass, coalesce(l.n, 0) AS leased,
                (SELECT clock FROM {s}.queue_clocks WHERE queue = $1) AS clock
            FROM p LEFT JOIN {s}.portal_turns t ON t.queue = $1 AND t.portal = p.portal
                LEFT JOIN leased l ON l.portal = p.portal
            WHERE p.portal IS NOT NULL AND EXISTS (
                SELECT 1 FROM {s}.messages m WHERE m.queue = $1 AND m.portal = p.portal
                    AND m.available_at <= $3 AND (m.lease_until IS NULL OR m.lease_until < $3)
                    {{free}}
                ORDER BY m.available_at, m.id LIMIT 1)
        """
        )
        # `status`'s portals of a queue (`portals`): the same portals and rows in handlers (with
        # $2 true), up to $3 portals, each one's rows counted on the portal index up to $4 past
        # its rows in handlers (in the index's order: without it, the planner may scan the table
        # for a large portal).
        self.status_portals_sql = (
            portals.format(now="now()")
            + f""",
            read AS (SELECT portal FROM p WHERE portal IS NOT NULL LIMIT $3)
            SELECT r.portal, coalesce(l.n, 0) AS leased,
                (SELECT count(*) FROM (SELECT 1 FROM {s}.messages m
                    WHERE m.queue = $1 AND m.portal = r.portal
                    ORDER BY m.available_at, m.id LIMIT coalesce(l.n, 0) + $4) x) AS n
            FROM read r LEFT JOIN leased l ON l.portal = r.portal
        """
        )
        # Each portal's oldest due, free rows, as many as asked of it. $4: the time.
        self._portal_due_sql = f"""
            SELECT w.portal, r.id, r.available_at FROM unnest($2::text[], $3::int[]) AS w(portal, n)
            CROSS JOIN LATERAL (
                SELECT id, available_at FROM {s}.messages m
                WHERE queue = $1 AND portal = w.portal AND available_at <= $4
                    AND (lease_until IS NULL OR lease_until < $4) {{free}}
                ORDER BY available_at, id LIMIT w.n FOR UPDATE SKIP LOCKED
            ) r
        """
        # The rows leased, and the turns written back: the served portals' passes, the clock,
        # and the passes the clock has reached gone (they say no more than none: such a portal
        # starts at the clock). $8: the time.
        self.lease_sql = f"""
            WITH served AS (
                INSERT INTO {s}.portal_turns SELECT $4, * FROM unnest($5::text[], $6::float8[])
                ON CONFLICT (queue, portal) DO UPDATE SET pass = excluded.pass
            ), clock AS (
                INSERT INTO {s}.queue_clocks VALUES ($4, $7)
                ON CONFLICT (queue) DO UPDATE SET clock = excluded.clock
            ), reached AS (
                DELETE FROM {s}.portal_turns WHERE queue = $4 AND pass <= $7
                    AND NOT portal = any($5::text[])
            )
            UPDATE {s}.messages SET lease_owner = $1,
                lease_until = $8::timestamptz + make_interval(secs => $2),
                deliveries = deliveries + 1, fence = fence + 1
            WHERE id = any($3::bigint[]) RETURNING {COLUMNS}
        """
        # Ordered claims in due order: $5 the time.
        self._ordered_sql = f"""
            UPDATE {s}.messages SET lease_owner = $1,
                lease_until = $5::timestamptz + make_interval(secs => $2),
                deliveries = deliveries + 1, fence = fence + 1
            WHERE id IN (
                SELECT id FROM {s}.messages m WHERE queue = $3 AND available_at <= $5
                    AND (lease_until IS NULL OR lease_until < $5) {{free}}
                ORDER BY available_at, id LIMIT $4 FOR UPDATE SKIP LOCKED
            ) RETURNING {COLUMNS}
        """
        # Coalescing: the later rows of each claimed row's group ($3) that are due and free, in
        # the order accepted, up to the first that is not due (a later row waiting for its retry:
        # those past it stay for the order to keep), $5 at most each. $4: the time.
        self._coalesce_sql = f"""
            WITH later AS (
                SELECT c.id AS anchor, x.id AS lid FROM unnest($3::bigint[]) AS c(id)
                JOIN {s}.messages m ON m.id = c.id AND m.order_key <> ''
                CROSS JOIN LATERAL (
                    SELECT o.id FROM {s}.messages o
                    WHERE o.queue = m.queue AND o.order_key = m.order_key AND o.id > m.id
                        AND o.available_at <= $4 AND (o.lease_until IS NULL OR o.lease_until < $4)
                        AND NOT EXISTS (SELECT 1 FROM {s}.messages p WHERE p.queue = m.queue
                            AND p.order_key = m.order_key AND p.id > m.id AND p.id < o.id
                            AND p.available_at > $4)
                    ORDER BY o.id LIMIT $5
                ) x
            )
            UPDATE {s}.messages u SET lease_owner = $1,
                lease_until = $4::timestamptz + make_interval(secs => $2),
                deliveries = u.deliveries + 1, fence = u.fence + 1
            FROM later WHERE u.id = later.lid
            RETURNING later.anchor, {", ".join("u." + c for c in COLUMNS.split(", "))}
        """
        # In the order of `messages_order` (all NULL: by id), so the planner walks it whatever its
        # statistics say (by id alone, right after a burst, it walked the primary key past every
        # keyed row: 13 ms a claim at 20,000).
        self._unkeyed_sql = f"""
            SELECT id, portal, body FROM {s}.messages WHERE queue = $1 AND order_key IS NULL
            ORDER BY order_key, id LIMIT $2
        """
        self._key_sql = f"""
            UPDATE {s}.messages m SET order_key = k.key
            FROM unnest($1::bigint[], $2::text[]) AS k(id, key) WHERE m.id = k.id
        """

    def _free(self, ordering: Ordering | None, now: str) -> str:
        return ordered_free(ordering, now).replace("{s}", self.s)

    async def locked(self, db: Db, queue: str) -> datetime:
        """The queue's claim lock, within `LOCK_WAIT_MS` (in the caller's transaction); the time
        once it is held."""
        await db.execute(f"SET LOCAL lock_timeout = {int(self.lock_wait_ms)}")
        await db.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"{self.lock_name}:{queue}")
        now: datetime = await db.fetchval("SELECT clock_timestamp()")
        return now

    async def stamp(self, db: Db, queue: str, ordering: Ordering) -> int:
        """Key the queue's rows no claim has keyed yet, the first accepted first, up to
        `STAMP_BATCH` (`messages_order` holds them together, in id order). Returns how many."""
        rows = await db.fetch(self._unkeyed_sql, queue, STAMP_BATCH)
        if rows:
            await db.execute(
                self._key_sql,
                [r["id"] for r in rows],
                [ordering.group(r["portal"], bytes(r["body"])) for r in rows],
            )
        return len(rows)

    async def coalesced(
        self, db: Db, rows: list[Row], owner: str, lease_s: float, now: datetime
    ) -> list[Row]:
        """Each claimed row with the later rows of its group waiting leased with it
        (`MAX_COALESCED` at most), in the claim's transaction: handed over as the latest, the
        others its `replaced`, oldest first."""
        records = await db.fetch(
            self._coalesce_sql, owner, lease_s, [r.id for r in rows], now, MAX_COALESCED
        )
        later: dict[int, list[Row]] = {}
        for r in records:
            later.setdefault(r["anchor"], []).append(row_of(r))
        out = []
        for row in rows:
            out.append(coalesced_row([row, *sorted(later.get(row.id, ()), key=lambda r: r.id)]))
        return out

    async def claim_ordered(
        self, db: Db, queue: str, owner: str, count: int, lease_s: float, ordering: Ordering
    ) -> list[Row]:
        """Up to `count` due rows in due order, none of them held back by its group's order
        (`ordered_free`), in one transaction under the queue's claim lock."""
        async with db.transaction():
            now = await self.locked(db, queue)
            await self.stamp(db, queue, ordering)
            sql = self._ordered_sql.replace("{free}", self._free(ordering, "$5"))
            records = await db.fetch(sql, owner, lease_s, queue, count, now)
            rows = sorted((row_of(r) for r in records), key=lambda r: r.id)
            if ordering.coalesce and rows:
                rows = await self.coalesced(db, rows, owner, lease_s, now)
        return rows

    async def claim_fair(
        self,
        db: Db,
        queue: str,
        owner: str,
        count: int,
        lease_s: float,
        fairness: Fairness,
        ordering: Ordering | None = None,
    ) -> list[Row]:
        """Up to `count` due rows, in turns among the portals (b24queue.transports.kit.fair), in
        one transaction under the queue's claim lock: the turns and the cap are read and written
        by one claim at a time, across every worker process; the rows are still locked
        `FOR UPDATE SKIP LOCKED`."""
        async with db.transaction():
            # Alone, before any read: each later statement sees what the previous claim wrote.
            now = await self.locked(db, queue)
            if ordering is not None and ordering.on:
                await self.stamp(db, queue, ordering)
            portals_sql = self._portals_sql.replace("{free}", self._free(ordering, "$3"))
            found = await db.fetch(portals_sql, queue, fairness.cap is not None, now)
            if not found:
                return []
            plan = Claim(
                count,
                [r["portal"] for r in found],
                {r["portal"]: r["pass"] for r in found if r["pass"] is not None},
                found[0]["clock"] or 0.0,
                fairness,
                {r["portal"]: r["leased"] for r in found},
            )
            due_sql = self._portal_due_sql.replace("{free}", self._free(ordering, "$4"))
            while wanted := plan.wanted():
                rows = await db.fetch(due_sql, queue, list(wanted), list(wanted.values()), now)
                ids: dict[str, list[int]] = {p: [] for p in wanted}
                for r in sorted(rows, key=lambda r: (r["available_at"], r["id"])):
                    ids[r["portal"]].append(r["id"])
                for portal, n in wanted.items():
                    plan.found(portal, ids[portal], n)
            chosen = plan.ids()
            if not chosen:
                return []
            turns = plan.turns
            records = await db.fetch(
                self.lease_sql,
                owner,
                lease_s,
                chosen,
                queue,
                list(turns.passes),
                list(turns.passes.values()),
                turns.clock,
                now,
            )
            rows = sorted((row_of(r) for r in records), key=lambda r: r.id)
            if ordering is not None and ordering.coalesce and rows:
                rows = await self.coalesced(db, rows, owner, lease_s, now)
        return rows

    async def portals(self, db: Db, queue: str) -> PortalsWaiting:
        """`status`'s portals of a queue, within the bounds of `kit.tables`."""
        read = await db.fetch(
            self.status_portals_sql,
            queue,
            True,
            tables.PORTALS_READ + 1,
            tables.PORTAL_EVENTS_READ + 1,
        )
        counted = [(r["portal"], r["n"]) for r in read[: tables.PORTALS_READ]]
        leased = {r["portal"]: r["leased"] for r in read}
        return tables.portals_waiting(counted, leased, len(read) <= tables.PORTALS_READ)
