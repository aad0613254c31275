"""The queue operations in PostgreSQL's SQL, one schema's worth: publish with routing (in SQL, by
the bindings' regular expressions, in the same statement that inserts and notifies), claim with a
lease (`FOR UPDATE SKIP LOCKED`), settle fenced by the delivery count, and the operator's view.
Times are the server's (`now()`), so hosts with skewed clocks agree on leases and due times.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from b24queue import _constants as c
from b24queue.events.envelope import Envelope
from b24queue.ordering import Ordering
from b24queue.queues import Fairness, portal_key, topic_regex
from b24queue.transports.kit.leased import Row
from b24queue.transports.kit.tables import CONSUMER, DLQ, UNROUTED, Depth, Overview
from b24queue.transports.kit.unrouted import UnroutedCap
from b24queue.transports.postgres.claims import COLUMNS, Claims, row_of
from b24queue.transports.postgres.db import Db, notify_channel


def _regex(pattern: str) -> str:
    """'' for an exact event name (matched by equality: PostgreSQL keeps only 32 compiled
    regular expressions per session, and routing slows down tenfold past them)."""
    return topic_regex(pattern) if any(w in ("*", "#") for w in pattern.split(".")) else ""


class Queries:
    """The statements for one schema (its name is checked by the settings: a plain identifier)."""

    def __init__(self, schema: str) -> None:
        s = f'"{schema}"'
        self.schema, self.channel = schema, notify_channel(schema)
        # One statement: route every event by the bindings as they are now, one row per bound
        # queue (or one in the unrouted queue, counted in its ledger: the events and bytes it
        # then holds come back), and notify each queue that got rows (sent on commit). Order: as
        # published, then by queue.
        self.publish_sql = f"""
            WITH e AS (
                SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[],
                    $5::timestamptz[], $6::text[], $9::text[])
                    WITH ORDINALITY AS e(message_id, routing_key, body, headers, stamp,
                        event_type, portal, n)
            ), routed AS (
                SELECT coalesce(r.queue, $7) AS queue, e.* FROM e LEFT JOIN LATERAL (
                    SELECT DISTINCT b.queue FROM {s}.bindings b
                    WHERE b.pattern = e.routing_key
                        OR (b.regex <> '' AND '.' || e.routing_key ~ b.regex)
                ) r ON true
            ), ins AS (
                INSERT INTO {s}.messages (queue, message_id, routing_key, body, headers, stamp,
                    event_type, portal)
                SELECT queue, message_id, routing_key, body, headers, stamp, event_type, portal
                FROM routed ORDER BY n, queue
                RETURNING queue, octet_length(body) AS size
            ), held AS (
                UPDATE {s}.queue_sizes z SET events = z.events + a.n, bytes = z.bytes + a.size
                FROM (SELECT count(*) AS n, sum(size) AS size FROM ins WHERE queue = $7) a
                WHERE z.queue = $7 AND a.n > 0
                RETURNING z.events, z.bytes
            )
            SELECT count(*) AS n, pg_notify($8, queue),
                (SELECT events FROM held) AS events, (SELECT bytes FROM held) AS bytes
            FROM ins GROUP BY queue
        """
        self.claim_sql = f"""
            UPDATE {s}.messages SET lease_owner = $1,
                lease_until = now() + make_interval(secs => $2), deliveries = deliveries + 1,
                fence = fence + 1
            WHERE id IN (
                SELECT id FROM {s}.messages WHERE queue = $3 AND available_at <= now()
                    AND (lease_until IS NULL OR lease_until < now())
                ORDER BY available_at, id LIMIT $4 FOR UPDATE SKIP LOCKED
            ) RETURNING {COLUMNS}
        """
        self.ack_sql = f"""
            DELETE FROM {s}.messages m USING unnest($1::bigint[], $2::text[], $3::int[])
                AS a(id, owner, fence)
            WHERE m.id = a.id AND m.lease_owner = a.owner AND m.fence = a.fence
            RETURNING m.id
        """
        self.dead_letter_sql = f"""
            WITH gone AS (
                DELETE FROM {s}.messages WHERE id = $1 AND lease_owner = $2 AND fence = $3
                RETURNING message_id, routing_key, body, stamp, event_type, portal, order_key
            )
            INSERT INTO {s}.messages (queue, message_id, routing_key, body, headers, stamp,
                event_type, portal, order_key)
            SELECT $4, message_id, routing_key, body, $5, stamp, event_type, portal, order_key
            FROM gone
            RETURNING id
        """
        self.retry_sql = f"""
            UPDATE {s}.messages SET headers = $4,
                available_at = now() + make_interval(secs => $5),
                lease_owner = NULL, lease_until = NULL, deliveries = 0
            WHERE id = $1 AND lease_owner = $2 AND fence = $3
        """
        self.s = s
        self.claims = Claims(schema)

    async def publish(
        self, db: Db, envelopes: Sequence[Envelope], unrouted: str
    ) -> tuple[int, int] | None:
        """Every event's rows, in one statement (one commit, when not inside a transaction).
        Returns what the unrouted queue holds now (events, bytes) when it got any of them."""
        per_queue = await db.fetch(
            self.publish_sql,
            [e.message_id for e in envelopes],
            [e.routing_key for e in envelopes],
            [e.body for e in envelopes],
            [json.dumps(e.headers) for e in envelopes],
            [e.timestamp for e in envelopes],
            [e.event_type for e in envelopes],
            unrouted,
            self.channel,
            [portal_key(e.headers.get(c.H_MEMBER_ID)) for e in envelopes],
        )
        for r in per_queue:
            if r["events"] is not None:
                return int(r["events"]), int(r["bytes"])
        return None

    async def drop_oldest(self, db: Db, cap: UnroutedCap) -> tuple[int, int]:
        """The unrouted queue's oldest rows, until it is within the cap (its ledger says how far
        over it is: each dropped row is read once, never the whole queue); one transaction, the
        ledger's row locked (two publishers at once drop once). Returns (events, bytes) gone."""
        queue = cap.queue
        async with db.transaction():
            held = await db.fetchrow(
                f"SELECT events, bytes FROM {self.s}.queue_sizes WHERE queue = $1 FOR UPDATE",
                queue,
            )
            if held is None:
                return 0, 0
            events, size = int(held["events"]), int(held["bytes"])
            dropped = freed = 0
            while cap.over(events, size):
                oldest = await db.fetch(
                    f"SELECT id, octet_length(body) AS size FROM {self.s}.messages "
                    "WHERE queue = $1 ORDER BY available_at, id LIMIT 100",
                    queue,
                )
                if not oldest:  # the ledger was ahead of the rows: the queue is empty
                    events = size = 0
                    break
                drop = cap.oldest_to_drop([(r["id"], r["size"]) for r in oldest], events, size)
                await db.execute(
                    f"DELETE FROM {self.s}.messages WHERE id = any($1::bigint[])",
                    [i for i, _ in drop],
                )
                gone = sum(n for _, n in drop)
                events, size = events - len(drop), size - gone
                dropped, freed = dropped + len(drop), freed + gone
            await db.execute(
                f"UPDATE {self.s}.queue_sizes SET events = $2, bytes = $3 WHERE queue = $1",
                queue,
                events,
                size,
            )
        return dropped, freed

    async def _shrank(self, db: Db, queue: str, sizes: list[int]) -> None:
        """Rows of `queue` deleted by an operator (replayed, purged): its ledger, if it has one."""
        if sizes:
            await db.execute(
                f"UPDATE {self.s}.queue_sizes SET events = greatest(0, events - $2), "
                "bytes = greatest(0, bytes - $3) WHERE queue = $1",
                queue,
                len(sizes),
                sum(sizes),
            )

    async def due_among(self, db: Db, queues: list[str]) -> list[str]:
        """Of `queues`, those with a due row no handler holds (one probe of `messages_due`
        each, in one statement): the worker process's watch (b24queue.transports.postgres.runner).
        An ordered queue's row its order holds back counts: its runner's claim finds nothing."""
        if not queues:
            return []
        rows = await db.fetch(
            "SELECT q FROM unnest($1::text[]) AS q WHERE EXISTS (SELECT 1 "
            f"FROM {self.s}.messages m WHERE m.queue = q AND m.available_at <= now() "
            "AND (m.lease_until IS NULL OR m.lease_until < now()))",
            queues,
        )
        return [r["q"] for r in rows]

    async def claim(
        self,
        db: Db,
        queue: str,
        owner: str,
        count: int,
        lease_s: float,
        fairness: Fairness | None = None,
        ordering: Ordering | None = None,
    ) -> list[Row]:
        """Up to `count` due rows: in turns among the portals with `fairness.on`, else in due
        order; with `ordering.on`, none held back by its group's order
        (b24queue.transports.postgres.claims)."""
        if fairness is not None and fairness.on:
            return await self.claims.claim_fair(
                db, queue, owner, count, lease_s, fairness, ordering
            )
        if ordering is not None and ordering.on:
            return await self.claims.claim_ordered(db, queue, owner, count, lease_s, ordering)
        records = await db.fetch(self.claim_sql, owner, lease_s, queue, count)
        return sorted((row_of(r) for r in records), key=lambda r: r.id)

    async def ack(self, db: Db, rows: Sequence[tuple[Row, str]]) -> list[bool]:
        """Each only while its delivery still holds the lease; with the rows coalesced into it
        (`Row.replaced`), each likewise."""
        every = [(r, owner) for row, owner in rows for r in (row, *row.replaced)]
        done = {
            r["id"]
            for r in await db.fetch(
                self.ack_sql,
                [row.id for row, _ in every],
                [owner for _, owner in every],
                [row.fence for row, _ in every],
            )
        }
        return [row.id in done for row, _ in rows]

    async def move(
        self,
        db: Db,
        row: Row,
        owner: str,
        *,
        queue: str,
        headers: dict[str, Any],
        delay_s: float,
        dead_letter: bool,
    ) -> bool:
        """Retry (the same row, later) or dead-letter (a new row at the end of the DLQ: a DLQ
        is in the order things failed), in one statement, only while this delivery holds the
        lease: there is no moment with the message in two places or none. The rows coalesced
        into it go the same way first, oldest first, in the caller's transaction (a retry keeps
        their headers; a dead letter gets its error)."""
        if row.replaced:
            held = await db.fetchval(
                f"SELECT 1 FROM {self.s}.messages WHERE id = $1 AND lease_owner = $2 "
                "AND fence = $3 FOR UPDATE",
                row.id,
                owner,
                row.fence,
            )
            if held is None:
                return False
            for r in row.replaced:
                own = {**r.headers, **headers} if dead_letter else r.headers
                await self.move(
                    db,
                    replace(r, replaced=()),
                    owner,
                    queue=queue,
                    headers=own,
                    delay_s=delay_s,
                    dead_letter=dead_letter,
                )
        encoded = json.dumps(headers, default=str)
        fence = (row.id, owner, row.fence)
        if dead_letter:
            return await db.fetchval(self.dead_letter_sql, *fence, queue, encoded) is not None
        status = await db.execute(self.retry_sql, *fence, encoded, delay_s)
        return bool(status == "UPDATE 1")

    async def beat(
        self,
        db: Db,
        owner: str,
        queue: str,
        name: str,
        ids: list[int],
        lease_s: float,
    ) -> None:
        async with db.transaction():
            await db.execute(
                f"INSERT INTO {self.s}.workers (owner, queue, name, seen_at) "
                "VALUES ($1, $2, $3, now()) ON CONFLICT (owner) DO UPDATE SET seen_at = now()",
                owner,
                queue,
                name,
            )
            # SKIP LOCKED, both: a row a settlement of this worker holds now (its handler has
            # just finished) is being deleted or moved, and waiting for it, while that
            # settlement's DELETE waits for another row this statement holds, was a deadlock
            # (seen draining a backlog: a 1 s stall, then one side aborted). The next beat
            # extends a row it skipped, long before its lease ends.
            await db.execute(
                f"UPDATE {self.s}.messages SET lease_until = now() + make_interval(secs => $1) "
                f"WHERE id IN (SELECT id FROM {self.s}.messages WHERE lease_owner = $2 "
                "AND id = any($3::bigint[]) FOR UPDATE SKIP LOCKED)",
                lease_s,
                owner,
                ids,
            )
            # A claim whose answer was lost (the connection dropped as it committed) leased rows
            # this worker never saw: give them back now, not when their lease ends.
            await db.execute(
                f"UPDATE {self.s}.messages SET lease_owner = NULL, lease_until = NULL "
                f"WHERE id IN (SELECT id FROM {self.s}.messages WHERE lease_owner = $1 "
                "AND NOT id = any($2::bigint[]) FOR UPDATE SKIP LOCKED)",
                owner,
                ids,
            )

    async def release(self, db: Db, owner: str) -> None:
        await db.execute(
            f"UPDATE {self.s}.messages SET lease_owner = NULL, lease_until = NULL "
            "WHERE lease_owner = $1",
            owner,
        )

    async def leave(self, db: Db, owner: str) -> None:
        await db.execute(f"DELETE FROM {self.s}.workers WHERE owner = $1", owner)

    async def declare(self, db: Db, queue: str, dlq: str, patterns: tuple[str, ...]) -> list[str]:
        """The consumer queue and its DLQ exist, and its bindings are exactly `patterns`.
        Returns the bindings removed."""
        async with db.transaction():
            await db.executemany(
                f"INSERT INTO {self.s}.queues VALUES ($1, $2) ON CONFLICT DO NOTHING",
                [(queue, CONSUMER), (dlq, DLQ)],
            )
            current = {
                r["pattern"]
                for r in await db.fetch(
                    f"SELECT pattern FROM {self.s}.bindings WHERE queue = $1 FOR UPDATE",
                    queue,
                )
            }
            await db.executemany(
                f"INSERT INTO {self.s}.bindings VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                [(queue, p, _regex(p)) for p in patterns if p not in current],
            )
            removed = sorted(current - set(patterns))
            await db.executemany(
                f"DELETE FROM {self.s}.bindings WHERE queue = $1 AND pattern = $2",
                [(queue, p) for p in removed],
            )
        return removed

    async def declare_unrouted(self, db: Db, unrouted: str) -> None:
        """The unrouted queue, and its ledger (counted once, when it has none yet)."""
        await db.execute(
            f"INSERT INTO {self.s}.queues VALUES ($1, $2) ON CONFLICT DO NOTHING",
            unrouted,
            UNROUTED,
        )
        if await db.fetchval(f"SELECT 1 FROM {self.s}.queue_sizes WHERE queue = $1", unrouted):
            return
        await db.execute(
            f"INSERT INTO {self.s}.queue_sizes SELECT $1, count(*), "
            f"coalesce(sum(octet_length(body)), 0) FROM {self.s}.messages WHERE queue = $1 "
            "ON CONFLICT DO NOTHING",
            unrouted,
        )

    async def first(self, db: Db, queue: str, limit: int, after: int) -> list[Row]:
        records = await db.fetch(
            f"SELECT {COLUMNS} FROM {self.s}.messages WHERE queue = $1 AND id > $2 "
            "ORDER BY id LIMIT $3",
            queue,
            after,
            limit,
        )
        return [row_of(r) for r in records]

    async def exists(self, db: Db, queue: str) -> bool:
        found = await db.fetchval(f"SELECT 1 FROM {self.s}.queues WHERE name = $1", queue)
        return found is not None

    async def depths(self, db: Db) -> dict[str, int]:
        records = await db.fetch(
            f"SELECT queue, count(*) AS n FROM {self.s}.messages GROUP BY queue"
        )
        return {r["queue"]: r["n"] for r in records}

    async def count(self, db: Db, queue: str) -> int:
        n = await db.fetchval(f"SELECT count(*) FROM {self.s}.messages WHERE queue = $1", queue)
        return int(n)

    async def overview(self, db: Db, alive_s: float) -> Overview:
        free = "(lease_until IS NULL OR lease_until < now())"
        queues = {
            r["queue"]: Depth(r["ready"], r["leased"], r["later"])
            for r in await db.fetch(
                "SELECT queue, "
                f"count(*) FILTER (WHERE {free} AND available_at <= now()) AS ready, "
                "count(*) FILTER (WHERE lease_until >= now()) AS leased, "
                f"count(*) FILTER (WHERE {free} AND available_at > now()) AS later "
                f"FROM {self.s}.messages GROUP BY queue"
            )
        }
        consumer_queues = [
            r["name"]
            for r in await db.fetch(
                f"SELECT name FROM {self.s}.queues WHERE kind = $1",
                CONSUMER,
            )
        ]
        live = await db.fetch(
            f"SELECT queue, name FROM {self.s}.workers "
            "WHERE seen_at >= now() - make_interval(secs => $1)",
            alive_s,
        )
        workers: dict[str, int] = {}
        for r in live:
            workers[r["queue"]] = workers.get(r["queue"], 0) + 1
        portals = {name: await self.claims.portals(db, name) for name in consumer_queues}
        names = sorted({r["name"] for r in live})
        return Overview(consumer_queues, queues, workers, names, portals)

    async def replay(
        self,
        db: Db,
        row: Row,
        headers: dict[str, Any],
        back_to: str | None,
        unrouted: str,
        source: str,
    ) -> bool:
        """A dead letter back to its queue, or an unrouted event to the queues bound to it now,
        in one transaction. False (nothing changed) when the row has left `source`, or an
        unrouted event is still bound by no queue."""
        encoded = json.dumps(headers, default=str)
        if back_to is not None:
            status = await db.execute(
                f"UPDATE {self.s}.messages SET queue = $1, headers = $2, "
                "available_at = now(), lease_owner = NULL, lease_until = NULL, deliveries = 0 "
                "WHERE id = $3 AND queue = $4",
                back_to,
                encoded,
                row.id,
                source,
            )
            if status != "UPDATE 1":
                return False
            await db.execute("SELECT pg_notify($1, $2)", self.channel, back_to)
            return True
        async with db.transaction():
            bound = await db.fetchval(
                f"SELECT 1 FROM {self.s}.bindings WHERE pattern = $1 "
                "OR (regex <> '' AND '.' || $1 ~ regex) LIMIT 1",
                row.routing_key,
            )
            if bound is None:
                return False
            gone = await db.fetch(
                f"DELETE FROM {self.s}.messages WHERE id = $1 AND queue = $2 "
                "RETURNING octet_length(body) AS size",
                row.id,
                source,
            )
            if not gone:
                return False
            await self._shrank(db, source, [r["size"] for r in gone])
            await self.publish(db, [row.envelope(headers)], unrouted)
        return True

    async def purge(self, db: Db, queue: str, count: int) -> int:
        async with db.transaction():
            gone = await db.fetch(
                f"DELETE FROM {self.s}.messages WHERE id IN (SELECT id FROM {self.s}.messages "
                "WHERE queue = $1 ORDER BY id LIMIT $2) RETURNING octet_length(body) AS size",
                queue,
                count,
            )
            await self._shrank(db, queue, [r["size"] for r in gone])
        return len(gone)
