"""Workers vacuum the queue's tables once dead rows pile up (b24queue.transports.postgres.vacuum),
on the machine's PostgreSQL (which runs with autovacuum off: nothing else clears them here)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from b24queue.events.envelope import envelope_for
from b24queue.settings import Settings
from b24queue.testing import make_event
from b24queue.transports import transport_for
from b24queue.transports.postgres import vacuum
from b24queue.transports.postgres.db import create_pool, ensure_schema
from b24queue.transports.postgres.queue import Queries
from tests.support.postgres import POSTGRES_URL, postgres_schema
from tests.support.wait import wait_until

QUEUE = "vac.q"


@pytest.fixture
async def schema() -> AsyncIterator[Settings]:
    async with postgres_schema(
        f"t{uuid.uuid4().hex[:10]}", postgres_vacuum_dead_rows=300
    ) as settings:
        yield settings


async def _churn(settings: Settings, events: int) -> None:
    """`events` published, claimed and acked: two dead rows each in `messages`."""
    q = Queries(settings.postgres_schema)
    db = await asyncpg.connect(POSTGRES_URL)
    try:
        await ensure_schema(db, settings.postgres_schema)
        await q.declare(db, QUEUE, QUEUE + ".dlq", ("#",))
        event = make_event("ONCRMDEALUPDATE", {"FIELDS": {"ID": "1"}})
        await q.publish(db, [envelope_for(event) for _ in range(events)], settings.unrouted)
        while rows := await q.claim(db, QUEUE, "w", 100, 60.0):
            assert all(await q.ack(db, [(r, "w") for r in rows]))
    finally:
        await db.close()


async def _vacuums(settings: Settings) -> int:
    db = await asyncpg.connect(POSTGRES_URL)
    try:
        found = await db.fetchval(
            "SELECT vacuum_count FROM pg_stat_user_tables WHERE schemaname = $1 "
            "AND relname = 'messages'",
            settings.postgres_schema,
        )
        return int(found or 0)
    finally:
        await db.close()


async def test_a_worker_session_vacuums_once_dead_rows_pass_the_threshold(
    schema: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vacuum, "CHECK_S", 0.2)
    await _churn(schema, 100)  # 200 dead rows: under the threshold
    session = await transport_for(schema).open_workers([])
    try:
        pool = await create_pool(schema, "test", 1)
        try:
            watch = vacuum.Vacuum(schema, pool, "test")
            await wait_until(lambda: _dead_at_least(watch, 200), 15, "the statistics")
            assert not await watch.once()  # under the threshold: nothing run
            assert await _vacuums(schema) == 0
            await _churn(schema, 200)  # 600 in all
            await wait_until(
                lambda: _vacuums_at_least(schema, 1), 20, "the session's VACUUM of messages"
            )
            await wait_until(
                lambda: _dead_below(watch, 300), 15, "the dead rows cleared by that VACUUM"
            )
        finally:
            await pool.close()
    finally:
        await session.close()


async def _dead_at_least(watch: vacuum.Vacuum, n: int) -> bool:
    return await watch.dead_rows() >= n


async def _dead_below(watch: vacuum.Vacuum, n: int) -> bool:
    return await watch.dead_rows() < n


async def _vacuums_at_least(settings: Settings, n: int) -> bool:
    return await _vacuums(settings) >= n


async def test_a_role_that_does_not_own_the_tables_says_so_and_leaves_them_to_autovacuum(
    schema: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    await _churn(schema, 200)
    name, role = schema.postgres_schema, f"r{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f'GRANT USAGE ON SCHEMA "{name}" TO {role}')
        await admin.execute(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{name}" TO {role}'
        )
        as_app = schema.model_copy(
            update={"broker_url": f"postgresql://{role}@127.0.0.1:5432/test"}
        )
        pool = await create_pool(as_app, "test", 1)
        try:
            watch = vacuum.Vacuum(as_app, pool, "test")
            with caplog.at_level(logging.WARNING, logger=vacuum.__name__):
                await watch.run()  # returns at once: nothing it may vacuum
            assert "does not own the tables" in caplog.text, caplog.text
            assert watch.runs == 0 and await _vacuums(schema) == 0
        finally:
            await pool.close()
    finally:
        await admin.execute(f'REVOKE ALL ON ALL TABLES IN SCHEMA "{name}" FROM {role}')
        await admin.execute(f'REVOKE ALL ON SCHEMA "{name}" FROM {role}')
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def test_dead_rows_an_old_snapshot_keeps_do_not_have_every_check_vacuum_again(
    schema: Settings,
) -> None:
    """A long transaction (a report, pg_dump) keeps the rows it may see: a VACUUM cannot clear
    them, and they must not make every check of every worker run it again."""
    reader = await asyncpg.connect(POSTGRES_URL)
    pool = await create_pool(schema, "test", 1)
    try:
        await _churn(schema, 10)  # the schema and its tables exist
        async with reader.transaction(isolation="repeatable_read"):
            await reader.fetchval(f'SELECT count(*) FROM "{schema.postgres_schema}".messages')
            await _churn(schema, 200)  # 400 dead rows this snapshot may still see
            watch = vacuum.Vacuum(schema, pool, "test")
            await wait_until(lambda: _dead_at_least(watch, 300), 15, "the statistics")
            assert await watch.once()  # ran, and cleared nothing the snapshot sees
            assert await watch.dead_rows() >= 300
            assert not await watch.once() and not await watch.once()
        await _churn(schema, 200)  # 400 more, past what the last VACUUM left
        await wait_until(lambda: _dead_at_least(watch, 700), 15, "the statistics")
        assert await watch.once() and watch.runs == 2
    finally:
        await pool.close()
        await reader.close()
