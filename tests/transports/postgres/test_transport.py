"""The PostgreSQL transport's own traps, on the machine's PostgreSQL (a schema per test): the CLI
tour, the schema's version and concurrent starts, the ingress spooling while PostgreSQL is
unreachable, two worker processes on one queue, workers' backends terminated under them."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest

from b24queue.errors import ConfigError
from b24queue.settings import Settings
from b24queue.transports.postgres.db import SCHEMA_VERSION, ensure_schema
from tests.support.postgres import POSTGRES_URL, postgres_schema
from tests.support.processes import cli, env_for, ingress_up, lines, post, start, stop
from tests.support.proxy import Proxy, free_port
from tests.support.wait import wait_until


@pytest.fixture
async def schema() -> AsyncIterator[Settings]:
    async with postgres_schema(f"t{uuid.uuid4().hex[:10]}") as settings:
        yield settings


async def test_the_tour_on_postgres(schema: Settings, tmp_path: Path) -> None:
    consumer = "tests.support.consumers:Narrowing"
    code, out = await cli(schema, "topology", consumer)
    assert code == 0 and "cli.deals.dlq" in out, out
    port = free_port()
    ingress = await ingress_up(schema, tmp_path, port)
    url = f"http://127.0.0.1:{port}/b24/events"
    code, out = await cli(schema, "send", "ONCRMDEALADD", "--url", url)
    assert code == 0 and out.startswith("200 "), out
    code, out = await cli(schema, "send", "ONTASKADD", "--url", url)  # nobody binds it
    assert code == 0, out
    assert await stop(ingress) == 0
    code, out = await cli(schema, "status", "--json")
    assert code == 0, out
    status = json.loads(out[out.index("{") :])
    [row] = status["queues"]
    assert (row["queue"], row["ready"], row["dead_letters"]) == ("cli.deals", 1, 0)
    assert status["unrouted"] == 1
    code, out = await cli(schema, "dlq", "list", schema.unrouted)
    assert code == 0 and "ONTASKADD" in out, out
    code, out = await cli(schema, "dlq", "purge", schema.unrouted, "--yes")
    assert code == 0 and "purged 1" in out, out
    assert "password" not in out


async def test_a_newer_schema_is_a_clear_error_and_concurrent_starts_are_safe(
    schema: Settings,
) -> None:
    name = schema.postgres_schema
    conns = [await asyncpg.connect(POSTGRES_URL) for _ in range(4)]
    try:
        # Four processes starting at once on an empty database: one creates, the others wait.
        await asyncio.gather(*(ensure_schema(c, name) for c in conns))
        version = await conns[0].fetchval(
            f'SELECT value FROM "{name}".meta WHERE key = $1', "schema"
        )
        assert version == str(SCHEMA_VERSION)
        await conns[0].execute(
            f"UPDATE \"{name}\".meta SET value = $1 WHERE key = 'schema'", str(SCHEMA_VERSION + 1)
        )
        with pytest.raises(ConfigError, match="newer than this b24queue knows"):
            await ensure_schema(conns[1], name)
    finally:
        for c in conns:
            await c.close()
    code, out = await cli(schema, "status")
    assert code != 0 and "newer than this b24queue knows" in out and "Traceback" not in out, out


async def test_unreachable_postgres_is_a_clear_error_without_the_password(
    schema: Settings,
) -> None:
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{free_port()}/test"
    code, out = await cli(schema.model_copy(update={"broker_url": url}), "status")
    assert code != 0 and "cannot reach PostgreSQL" in out, out
    assert "s3cret-pw" not in out and "Traceback" not in out, out


async def test_the_ingress_spools_while_postgres_is_unreachable_then_forwards(
    schema: Settings, tmp_path: Path
) -> None:
    proxy = Proxy(5432)
    await proxy.start()
    via_proxy = schema.model_copy(
        update={"broker_url": f"postgresql://postgres@127.0.0.1:{proxy.port}/test"}
    )
    code, out = await cli(schema, "topology", "tests.support.consumers:Narrowing")
    assert code == 0, out
    port = free_port()
    ingress = await ingress_up(via_proxy, tmp_path, port)
    url = f"http://127.0.0.1:{port}/b24/events"
    try:
        before = await post(url, 3)
        await proxy.cut()  # PostgreSQL "goes away" for the ingress only
        during = await post(url, 5)  # answered 200 from the spool
        await proxy.start()
        db = await asyncpg.connect(POSTGRES_URL)
        try:

            async def stored() -> set[str]:
                rows = await db.fetch(
                    f'SELECT message_id FROM "{schema.postgres_schema}".messages WHERE queue = $1',
                    "cli.deals",
                )
                return {r["message_id"] for r in rows}

            async def all_there() -> bool:
                return set(before + during) <= await stored()

            await wait_until(all_there, 60, "the spooled events forwarded")
        finally:
            await db.close()
    finally:
        await proxy.cut()
    assert await stop(ingress) == 0


async def test_two_worker_processes_never_run_one_message_at_once(
    schema: Settings, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    env = env_for(schema, record, B24QT_SLEEP_S="0.01", B24QT_PREFETCH="8")
    code, out = await cli(schema, "topology", "tests.support.consumers:Recorder")
    assert code == 0, out
    workers = [await start("worker", "tests.support.consumers:Recorder", env=env) for _ in range(2)]
    port = free_port()
    ingress = await ingress_up(schema, tmp_path, port)
    url = f"http://127.0.0.1:{port}/b24/events"
    ids = [i for batch in await asyncio.gather(*(post(url, 50) for _ in range(4))) for i in batch]
    await wait_until(lambda: set(lines(record, "done")) == set(ids), 60, "all 200 handled")
    for proc in (*workers, ingress):
        assert await stop(proc) == 0
    starts = lines(record, "start")
    assert len(starts) == len(ids) == len(set(starts)), "a message was handled twice"


async def test_terminated_worker_backends_lose_nothing(schema: Settings, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    env = env_for(schema, record, B24QT_SLEEP_S="0.02", B24QT_PREFETCH="8")
    code, out = await cli(schema, "topology", "tests.support.consumers:Recorder")
    assert code == 0, out
    worker = await start("worker", "tests.support.consumers:Recorder", env=env)
    port = free_port()
    ingress = await ingress_up(schema, tmp_path, port)
    url = f"http://127.0.0.1:{port}/b24/events"
    db = await asyncpg.connect(POSTGRES_URL)
    try:
        first = await post(url, 40)
        await wait_until(lambda: len(lines(record, "start")) > 5, 30, "the worker handling")
        killed = await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name LIKE 'b24queue worker cli.deals %'"
        )
        assert killed >= 1
        second = await post(url, 40)
        ids = set(first + second)
        await wait_until(lambda: ids <= set(lines(record, "done")), 60, "every event handled")
    finally:
        await db.close()
    for proc in (worker, ingress):
        assert await stop(proc) == 0


async def test_a_role_without_create_runs_on_a_schema_made_by_its_owner(schema: Settings) -> None:
    """What docs/transports/postgresql.md promises: after the first start, USAGE and table
    privileges suffice."""
    from b24queue.events.envelope import envelope_for
    from b24queue.testing import make_event
    from b24queue.transports import transport_for

    name, role = schema.postgres_schema, f"r{uuid.uuid4().hex[:10]}"
    code, out = await cli(schema, "topology", "tests.support.consumers:Narrowing")
    assert code == 0, out
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f'GRANT USAGE ON SCHEMA "{name}" TO {role}')
        await admin.execute(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{name}" TO {role}'
        )
        await admin.execute(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA "{name}" TO {role}')
        as_app = schema.model_copy(
            update={"broker_url": f"postgresql://{role}@127.0.0.1:5432/test"}
        )
        async with transport_for(as_app).publisher("least-privilege") as sink:
            await wait_until(sink.is_ready, 15, "the publisher connected as the app's role")
            await sink.publish(envelope_for(make_event("ONCRMDEALADD", {"FIELDS": {"ID": "1"}})))
        status = await transport_for(as_app).status()
        assert [(r.queue, r.ready) for r in status.queues] == [("cli.deals", 1)]
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            conn = await asyncpg.connect(as_app.broker_url)
            try:
                await conn.execute(f'CREATE TABLE "{name}".nope (id int)')
            finally:
                await conn.close()
    finally:
        await admin.execute(f'REVOKE ALL ON ALL TABLES IN SCHEMA "{name}" FROM {role}')
        await admin.execute(f'REVOKE ALL ON ALL SEQUENCES IN SCHEMA "{name}" FROM {role}')
        await admin.execute(f'REVOKE ALL ON SCHEMA "{name}" FROM {role}')
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def test_a_stale_settlement_never_lands_on_a_later_claim(schema: Settings) -> None:
    """Claimed, lease ran out, claimed again, retried, claimed a third time: the first claim's
    ack must not delete the row the third one is handling (the fence is never reset)."""
    from b24queue.events.envelope import envelope_for
    from b24queue.testing import make_event
    from b24queue.transports.postgres.queue import Queries

    q = Queries(schema.postgres_schema)
    db = await asyncpg.connect(POSTGRES_URL)
    try:
        await ensure_schema(db, schema.postgres_schema)
        await q.declare(db, "fence.q", "fence.q.dlq", ("#",))
        await q.publish(db, [envelope_for(make_event("ONCRMDEALADD", {}))], schema.unrouted)
        [first] = await q.claim(db, "fence.q", "w1", 1, 0.0)  # a lease that is over at once
        [second] = await q.claim(db, "fence.q", "w1", 1, 60.0)
        assert await q.move(
            db, second, "w1", queue="fence.q", headers={}, delay_s=0.0, dead_letter=False
        )
        [third] = await q.claim(db, "fence.q", "w1", 1, 60.0)
        assert (first.deliveries, third.deliveries) == (1, 1)  # redelivered counts anew
        assert await q.ack(db, [(first, "w1"), (second, "w1")]) == [False, False]
        assert await q.count(db, "fence.q") == 1
        assert await q.ack(db, [(third, "w1")]) == [True]
    finally:
        await db.close()


async def test_a_heartbeat_never_waits_for_a_row_a_settlement_holds(schema: Settings) -> None:
    """A worker's heartbeat (extending its rows' leases) and its group-committed acks run on two
    connections: the heartbeat waiting for a row the ack batch held, while the batch waited for
    another row the heartbeat held, was a deadlock (seen in the server's log draining a backlog:
    a 1 s stall, then one side aborted). Now the heartbeat passes a row that is locked."""
    from b24queue.events.envelope import envelope_for
    from b24queue.testing import make_event
    from b24queue.transports.postgres.queue import Queries

    q = Queries(schema.postgres_schema)
    settle, beat = await asyncpg.connect(POSTGRES_URL), await asyncpg.connect(POSTGRES_URL)
    try:
        await ensure_schema(settle, schema.postgres_schema)
        await q.declare(settle, "beat.q", "beat.q.dlq", ("#",))
        events = [envelope_for(make_event("ONCRMDEALADD", {})) for _ in range(2)]
        await q.publish(settle, events, schema.unrouted)
        first, second = await q.claim(settle, "beat.q", "w1", 2, 60.0)
        async with settle.transaction():
            assert await q.ack(settle, [(second, "w1")]) == [True]  # held to the commit
            async with asyncio.timeout(3):  # it waited for that commit: forever, here
                await q.beat(beat, "w1", "beat.q", "w", [first.id, second.id], 600.0)
            assert await q.ack(settle, [(first, "w1")]) == [True]  # not waiting on the beat
        assert await q.count(settle, "beat.q") == 0
    finally:
        await settle.close()
        await beat.close()


async def test_portals_whose_rows_all_wait_for_a_retry_cost_a_fair_claim_no_rounds(
    schema: Settings,
) -> None:
    """A downstream API down: many portals' events wait for their retries beside one portal's
    flood. Those portals have nothing due: a fair claim must not give them turns (each would
    read nothing and the plan be made again: a round trip each, under the queue's lock)."""
    from b24queue.events.envelope import envelope_for
    from b24queue.queues import Fairness
    from b24queue.testing import make_event
    from b24queue.transports.postgres.queue import Queries

    q = Queries(schema.postgres_schema)
    db = await asyncpg.connect(POSTGRES_URL)
    try:
        await ensure_schema(db, schema.postgres_schema)
        await q.declare(db, "fair.q", "fair.q.dlq", ("#",))
        e = envelope_for(make_event("ONCRMDEALADD", {}))
        await q.publish(db, [e] * 200, schema.unrouted)
        s = f'"{schema.postgres_schema}"'
        # The flood's portal sorts after the others (ties go to the name that sorts first), and
        # 300 portals whose one event each waits for a retry an hour away.
        await db.execute(f"UPDATE {s}.messages SET portal = 'zz-flood'")
        await db.execute(
            f"INSERT INTO {s}.messages (queue, message_id, routing_key, body, headers, stamp, "
            "event_type, available_at, portal) SELECT 'fair.q', 'r' || i, 'ONCRMDEALADD', "
            "'\\x7b7d', '{}', now(), 'ONCRMDEALADD', now() + interval '1 hour', "
            "'retrying' || lpad(i::text, 4, '0') FROM generate_series(1, 300) i"
        )

        class Counting:
            """The connection, counting the statements that return rows."""

            fetched = 0

            async def fetch(self, *args: Any) -> list[asyncpg.Record]:
                self.fetched += 1
                return await db.fetch(*args)  # type: ignore[no-any-return]

            def __getattr__(self, name: str) -> Any:
                return getattr(db, name)

        counting = Counting()
        [row] = await q.claim(cast(Any, counting), "fair.q", "w", 1, 60.0, Fairness(on=True))
    finally:
        await db.close()
    assert row.message_id == e.message_id
    assert counting.fetched <= 4, f"{counting.fetched} statements for one slot"


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_claim_waits_a_bounded_time_for_the_queues_lock_and_dates_its_lease_after_it(
    schema: Settings, ordered: bool
) -> None:
    """A fair or ordered claim of a queue waits for the one under way (its advisory lock): its
    lease and due times are taken once it holds the lock (not `now()`, the transaction's start,
    before the wait: the lease would end early by the wait), and it waits at most its bound
    (then it fails, and the worker claims again after its poll) so a stuck claim cannot hang
    the others."""
    from b24queue.events.envelope import envelope_for
    from b24queue.ordering import Ordering, path_reader
    from b24queue.queues import Fairness
    from b24queue.testing import make_event
    from b24queue.transports.postgres.queue import Queries

    q = Queries(schema.postgres_schema)
    q.claims.lock_wait_ms = 300
    ordering = Ordering(path_reader("data.FIELDS.ID"), True, "T") if ordered else None
    lock = f"b24queue:{schema.postgres_schema}:lock.q"
    db = await asyncpg.connect(POSTGRES_URL)
    holder = await asyncpg.connect(POSTGRES_URL)
    try:
        await ensure_schema(db, schema.postgres_schema)
        await q.declare(db, "lock.q", "lock.q.dlq", ("#",))
        e = envelope_for(make_event("ONCRMDEALUPDATE", {"FIELDS": {"ID": "7"}}))
        await q.publish(db, [e], schema.unrouted)
        # A claim that holds the lock for good: the next one gives up within its bound.
        await holder.execute("SELECT pg_advisory_lock(hashtext($1))", lock)
        started = asyncio.get_running_loop().time()
        with pytest.raises(asyncpg.exceptions.LockNotAvailableError):
            await q.claim(db, "lock.q", "w", 1, 60.0, Fairness(on=not ordered), ordering)
        assert asyncio.get_running_loop().time() - started < 3.0
        # One that holds it for a second: the lease runs 60 s from when the claim got the lock.
        q.claims.lock_wait_ms = 5000
        claim = asyncio.create_task(
            q.claim(db, "lock.q", "w", 1, 60.0, Fairness(on=not ordered), ordering)
        )
        await asyncio.sleep(1.0)
        released = await holder.fetchval("SELECT clock_timestamp()")
        await holder.execute("SELECT pg_advisory_unlock(hashtext($1))", lock)
        [row] = await claim
        until = await db.fetchval(
            f'SELECT lease_until FROM "{schema.postgres_schema}".messages WHERE id = $1', row.id
        )
    finally:
        await holder.close()
        await db.close()
    assert (until - released).total_seconds() >= 59.9, (until, released)


async def test_idle_runners_are_watched_by_one_statement_not_each_claiming(
    schema: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle worker with 30 consumers: each runner claimed at every poll (30 claims per poll:
    5% of a core with 100 consumers); now one statement per poll reads which queues are due, and
    an event still reaches its runner."""
    from b24queue import Event, EventConsumer
    from b24queue.events.envelope import envelope_for
    from b24queue.testing import make_event
    from b24queue.transports import transport_for
    from b24queue.transports.postgres.queue import Queries
    from b24queue.worker import Worker

    calls: dict[str, int] = {"claim": 0, "due_among": 0}
    for name in calls:
        original = getattr(Queries, name)

        async def counted(self: Any, *args: Any, _f: Any = original, _n: str = name) -> Any:
            calls[_n] += 1
            return await _f(self, *args)

        monkeypatch.setattr(Queries, name, counted)
    seen: list[str] = []

    async def handle(self: EventConsumer, event: Event) -> None:
        seen.append(event.name)

    classes = [
        type(
            "C", (EventConsumer,), {"queue": f"idle.q{i}", "events": (f"ONX{i}",), "handle": handle}
        )
        for i in range(30)
    ]
    async with Worker(schema, classes):
        await asyncio.sleep(0.5)  # every runner started and idle
        for name in calls:
            calls[name] = 0
        await asyncio.sleep(1.5)  # three polls of 0.5 s
        assert calls["claim"] < 30 and 1 <= calls["due_among"] <= 6, calls  # was ~90 claims
        async with transport_for(schema).publisher("test") as sink:
            await wait_until(sink.is_ready, 15, "the publisher connected")
            await sink.publish(envelope_for(make_event("ONX7", {})))
        await wait_until(lambda: seen == ["ONX7"], 10, "the event handled")
