"""Order within an entity on PostgreSQL's queue, claim by claim: a key its text cannot hold (a
NUL: the ingress accepts `data[FIELDS][ID]=4%002`) is kept as a digest, and fails no claim of
the queue; a coalesced retry keeps its attempt and delivery counts when a newer event joins."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from b24queue import _constants as c
from b24queue.events.envelope import envelope_for
from b24queue.events.event import FORM_TYPE, parse_event
from b24queue.ordering import Ordering, path_reader
from b24queue.testing import make_event
from b24queue.transports.postgres.db import ensure_schema
from b24queue.transports.postgres.queue import Queries
from tests.support.postgres import POSTGRES_URL

SCHEMA = "ordkeys_nul"


def _event(member: str, deal: str):
    body = (
        f"event=ONCRMDEALUPDATE&data%5BFIELDS%5D%5BID%5D={deal}&auth%5Bmember_id%5D={member}"
        "&auth%5Bapplication_token%5D=t&auth%5Bdomain%5D=x.bitrix24.com"
    ).encode()
    return envelope_for(parse_event(FORM_TYPE, body))


@pytest.mark.asyncio
async def test_a_key_with_a_nul_fails_no_ordered_claim_of_the_queue() -> None:
    db = await asyncpg.connect(POSTGRES_URL)
    try:
        await db.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
        await ensure_schema(db, SCHEMA)
        q = Queries(SCHEMA)
        await q.declare(db, "o", "o.dlq", ("#",))
        # another portal's event first, then one portal's deal "4%002" (a NUL in its ID)
        await q.publish(db, [_event("other", "7"), _event("abc", "4%002")], "u")
        ordering = Ordering(path_reader("data.FIELDS.ID"), True, "C")
        errors, claimed = [], 0
        for _ in range(3):
            try:
                claimed += len(await q.claim(db, "o", "w", 10, 60.0, None, ordering))
                errors.append(None)
            except Exception as exc:
                errors.append(type(exc).__name__)
        assert errors == [None, None, None], errors
        assert claimed == 2  # both events, the NUL key's among them
    finally:
        await db.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
        await db.close()


@pytest.mark.asyncio
async def test_a_coalesced_retry_keeps_its_attempt_and_deliveries_when_a_newer_event_joins() -> (
    None
):
    schema = f"ordcoal_{uuid.uuid4().hex[:8]}"
    db = await asyncpg.connect(POSTGRES_URL)

    def deal(seq: str):
        return envelope_for(make_event("ONCRMDEALUPDATE", {"FIELDS": {"ID": "42", "SEQ": seq}}))

    try:
        await ensure_schema(db, schema)
        q = Queries(schema)
        await q.declare(db, "o", "o.dlq", ("#",))
        ordering = Ordering(path_reader("data.FIELDS.ID"), True, "C", coalesce=True)
        await q.publish(db, [deal("0"), deal("1")], "u")
        [d1] = await q.claim(db, "o", "w", 5, 60.0, None, ordering)
        assert len(d1.replaced) == 1 and d1.headers.get(c.H_ATTEMPT, 1) == 1
        # the delivery failed: retried (attempt 2 on the latest) in 0.1 s
        assert await q.move(
            db, d1, "w", queue="o", headers={c.H_ATTEMPT: 2}, delay_s=0.1, dead_letter=False
        )
        await q.publish(db, [deal("2")], "u")
        await asyncio.sleep(0.2)
        # claimed again, its worker gone before settling (its lease ends at once): deliveries 2
        [d2] = await q.claim(db, "o", "w", 5, -1.0, None, ordering)
        assert len(d2.replaced) == 2 and d2.headers[c.H_ATTEMPT] == 2
        [d3] = await q.claim(db, "o", "w", 5, 60.0, None, ordering)
        assert len(d3.replaced) == 2 and d3.deliveries == 2 and d3.headers[c.H_ATTEMPT] == 2
    finally:
        await db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await db.close()
