"""The SQLite transport's own traps (no broker): a locked database, a handler outliving its
lease, a stop during a claim, one failing write in a batch, DLQ order, unrouted replay, a failed
start, a large backlog. The shared scenarios are in tests/conformance/."""

from __future__ import annotations

import asyncio
import collections
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from b24queue import Event, EventConsumer, Reject
from b24queue.auth.tokens import StaticTokens
from b24queue.events.envelope import envelope_for
from b24queue.ingress.app import create_app
from b24queue.queues import Fairness
from b24queue.settings import Settings, load_settings
from b24queue.testing import make_event
from b24queue.transports import transport_for
from b24queue.transports.kit import leased
from b24queue.transports.sqlite import db as sqlite_db
from b24queue.transports.sqlite import queue as q
from b24queue.transports.sqlite.db import Database
from b24queue.worker import Worker
from tests.support.samples import SAMPLE_TOKEN, sample_form
from tests.support.wait import wait_until


def settings_for(tmp_path: Path) -> Settings:
    return load_settings(
        broker_url=f"sqlite:{tmp_path / 'queue.sqlite3'}", sqlite_poll_s=0.02, shutdown_timeout_s=2
    )


def consumer(queue: str, handle: Any, **attrs: Any) -> type[EventConsumer]:
    body = {"queue": queue, "events": ("#",), "handle": handle, **attrs}
    return type("C", (EventConsumer,), body)


async def publish(settings: Settings, *ids: str) -> None:
    async with transport_for(settings).publisher("test") as sink:
        for i in ids:
            await sink.publish(envelope_for(make_event("ONCRMDEALADD", {"FIELDS": {"ID": i}})))


async def test_a_database_locked_for_a_while_does_not_stop_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_db, "BUSY_TIMEOUT_MS", 100)
    settings = settings_for(tmp_path)
    seen: list[str] = []

    async def handle(self: EventConsumer, event: Event) -> None:
        seen.append(event.data["FIELDS"]["ID"])

    async with Worker(settings, [consumer("locked", handle)]):
        other = sqlite3.connect(tmp_path / "queue.sqlite3", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock for a while
        await asyncio.sleep(0.5)  # the worker's writes fail meanwhile (the point of the test)
        other.execute("ROLLBACK")
        other.close()
        await publish(settings, "1")
        await wait_until(lambda: seen == ["1"], 10, "the event handled after the lock")


async def test_a_handler_longer_than_its_lease_never_runs_twice_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leased, "DEFAULT_LEASE_S", 0.3)
    monkeypatch.setattr(leased, "LEASE_MARGIN_S", 0.0)
    monkeypatch.setattr(leased, "HEARTBEAT_S", 0.1)
    settings = settings_for(tmp_path)
    running = 0
    peak = 0
    done: list[bool] = []

    async def slow(self: EventConsumer, event: Event) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(1.5)  # five leases long: renewed by the heartbeat, never lost
        running -= 1
        done.append(event.redelivered)

    cls = consumer("long", slow, handle_timeout_s=None)
    async with Worker(settings, [cls]), Worker(settings, [cls]):
        await publish(settings, "1")
        await wait_until(lambda: done == [False], 10, "handled once")
        await asyncio.sleep(0.5)  # a second, wrong delivery would start within this
    assert peak == 1 and done == [False]


async def test_a_stop_leaves_no_row_leased(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    release = asyncio.Event()

    async def blocked(self: EventConsumer, event: Event) -> None:
        await release.wait()

    worker = Worker(settings, [consumer("stop", blocked, prefetch=2)])
    await worker.__aenter__()
    await publish(settings, "1", "2", "3")
    await wait_until(lambda: worker.runners[0].in_flight == 2, 10, "two in flight")
    await worker.shutdown()  # the two are cancelled after the shutdown timeout
    db = sqlite3.connect(tmp_path / "queue.sqlite3")
    leased = db.execute("SELECT count(*) FROM messages WHERE lease_owner IS NOT NULL").fetchone()
    total = db.execute("SELECT count(*) FROM messages").fetchone()
    db.close()
    assert (leased[0], total[0]) == (0, 3)


async def test_one_failing_write_is_undone_alone(tmp_path: Path) -> None:
    def insert(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO meta VALUES ('x', '1')")
        return 1

    def broken(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO meta VALUES ('y', '1')")
        raise ValueError("this one fails")

    async with Database(tmp_path / "q.sqlite3") as db:
        results = await asyncio.gather(db.write(insert), db.write(broken), return_exceptions=True)
        assert results[0] == 1 and isinstance(results[1], ValueError)
        keys = await db.read(lambda c: {k for (k,) in c.execute("SELECT key FROM meta")})
    assert "x" in keys and "y" not in keys


async def test_the_dlq_is_in_the_order_things_failed_and_purge_takes_what_was_shown(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path)
    rejected: list[str] = []
    ids: dict[str, str | None] = {}
    hold_first = asyncio.Event()

    async def handle(self: EventConsumer, event: Event) -> None:
        ids[event.data["FIELDS"]["ID"]] = event.message_id
        if event.data["FIELDS"]["ID"] == "old":
            await hold_first.wait()  # the older event fails later
        rejected.append(event.data["FIELDS"]["ID"])
        raise Reject("no")

    async with Worker(settings, [consumer("order", handle)]):
        await publish(settings, "old", "new")
        await wait_until(lambda: rejected == ["new"], 10)
        async with transport_for(settings).dead_letters("order") as dlq:
            shown = await dlq.count()
            hold_first.set()
            await wait_until(lambda: rejected == ["new", "old"], 10)
            assert await dlq.purge(shown) == 1
            _, left = await dlq.list(10)
    # The one counted and shown ("new") is purged; the older one, dead-lettered after, is kept.
    assert [x.message_id for x in left] == [ids["old"]]


async def test_an_unrouted_event_still_unbound_is_not_replayed(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    await publish(settings, "1")  # no consumer declared: unrouted
    async with transport_for(settings).dead_letters(settings.unrouted) as unrouted:
        assert await unrouted.replay() == (0, 1)
        assert await unrouted.count() == 1


async def test_a_failed_start_leaves_nothing_running(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)

    async def handle(self: EventConsumer, event: Event) -> None:
        return None

    async def broken_start(self: EventConsumer) -> None:
        raise RuntimeError("cannot open a client")

    good = consumer("good", handle)
    bad = type(
        "Bad",
        (EventConsumer,),
        {"queue": "bad", "events": ("#",), "handle": handle, "on_start": broken_start},
    )
    with pytest.raises(RuntimeError):
        async with Worker(settings, [good, bad]):
            pass
    await asyncio.sleep(0)
    claiming = [t for t in asyncio.all_tasks() if t.get_name().startswith("b24queue-claim")]
    assert claiming == []


def test_a_stale_settlement_never_lands_on_a_later_claim(tmp_path: Path) -> None:
    """As on PostgreSQL: the fence counts every claim and a retry does not reset it."""
    from b24queue.transports.sqlite import queue as q

    db = sqlite_db.connect(tmp_path / "q.sqlite3")
    try:
        q.declare(db, "fence.q", "fence.q.dlq", ("#",))
        q.publish(db, [envelope_for(make_event("ONCRMDEALADD", {}))], "b24.unrouted")
        [first] = q.claim(db, "fence.q", "w1", 1, -1.0)  # a lease that is already over
        [second] = q.claim(db, "fence.q", "w1", 1, 60.0)
        assert q.move(db, second, "w1", queue="fence.q", headers={})
        [third] = q.claim(db, "fence.q", "w1", 1, 60.0)
        assert (first.deliveries, third.deliveries) == (1, 1)
        assert not q.ack(db, first, "w1") and not q.ack(db, second, "w1")
        assert q.ack(db, third, "w1")
    finally:
        db.close()


def test_claims_follow_due_order_as_on_postgresql(tmp_path: Path) -> None:
    """A retried event is due again behind what arrived before its delay ended; a row handed
    back keeps its place."""
    db = sqlite_db.connect(tmp_path / "q.sqlite3")
    try:
        q.declare(db, "order.q", "order.q.dlq", ("#",))
        for i in ("a", "b", "c"):
            q.publish(db, [envelope_for(make_event("ONCRMDEALADD", {"ID": i}))], "b24.unrouted")
        [a] = q.claim(db, "order.q", "w1", 1, 60.0)
        assert q.move(db, a, "w1", queue="order.q", headers={})  # retried, due now
        [b] = q.claim(db, "order.q", "w1", 1, 60.0)
        q.release(db, "w1")  # handed back by a stopping worker
        order = [
            json.loads(row.body)["data"]["ID"]
            for _ in range(3)
            for row in q.claim(db, "order.q", "w2", 1, 60.0)  # one at a time: a batch is by id
        ]
    finally:
        db.close()
    assert json.loads(b.body)["data"]["ID"] == "b"
    assert order == ["b", "c", "a"]


def test_a_version_1_queue_file_gains_the_fence_and_portal_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    old.execute("INSERT INTO meta VALUES ('schema', '1')")
    old.execute(
        "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, "
        "message_id TEXT NOT NULL, routing_key TEXT NOT NULL, body BLOB NOT NULL, "
        "headers TEXT NOT NULL, timestamp TEXT NOT NULL, event_type TEXT NOT NULL, "
        "available_at REAL NOT NULL, lease_owner TEXT, lease_until REAL, "
        "deliveries INTEGER NOT NULL DEFAULT 0)"
    )
    old.commit()
    old.close()
    db = sqlite_db.connect(path)
    try:
        columns = {r[1] for r in db.execute("PRAGMA table_info(messages)")}
        assert {"fence", "portal"} <= columns
        version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        assert version == str(sqlite_db.SCHEMA_VERSION)
    finally:
        db.close()


async def test_a_message_delivered_too_often_is_dead_lettered_unhandled(tmp_path: Path) -> None:
    """What RabbitMQ's delivery limit does: a message whose handler keeps killing the worker
    (each claim ends with no settlement) goes to the DLQ instead of looping for ever."""
    settings = settings_for(tmp_path)
    seen: list[str] = []

    async def handle(self: EventConsumer, event: Event) -> None:
        seen.append(event.data["FIELDS"]["ID"])

    cls = consumer("limited", handle, max_deliveries=3)
    async with transport_for(settings).publisher("test"):
        pass
    await transport_for(settings).declare([cls])
    await publish(settings, "1", "2")
    db = sqlite3.connect(tmp_path / "queue.sqlite3")
    # "1" was claimed three times already, and each time its worker died.
    db.execute("UPDATE messages SET deliveries = 3 WHERE id = (SELECT min(id) FROM messages)")
    db.commit()
    db.close()
    async with Worker(settings, [cls]):
        await wait_until(lambda: seen == ["2"], 10, "the other event handled")
        async with transport_for(settings).dead_letters("limited.dlq") as dlq:
            total, [letter] = await dlq.list(5)
    assert total == 1 and letter.reason == "delivery_limit", letter
    assert seen == ["2"]


def backlog(path: Path, queue: str, count: int) -> None:
    """`count` more events waiting in `queue`, written as the ingress writes them (in one
    transaction: a test's backlog in about a second)."""
    e = envelope_for(make_event("ONCRMDEALADD", {"FIELDS": {"ID": "1"}}))
    fields = (e.routing_key, e.body, json.dumps(e.headers), e.timestamp.isoformat(), e.event_type)
    now = time.time()
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO messages (queue, message_id, routing_key, body, headers, timestamp, "
            "event_type, available_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ((queue, f"backlog-{i}", *fields, now) for i in range(count)),
        )
        db.execute("COMMIT")
    finally:
        db.close()


def traced(db: sqlite3.Connection, op: Callable[[], object]) -> tuple[int, list[str]]:
    """Run `op`: SQLite's VM steps for it (in hundreds), and the statements it ran on `db`, with
    their values."""
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0  # go on

    statements: list[str] = []
    db.set_trace_callback(statements.append)
    db.set_progress_handler(step, 100)
    try:
        op()
    finally:
        db.set_progress_handler(None, 0)
        db.set_trace_callback(None)
    return steps, statements


def plans(db: sqlite3.Connection, statements: list[str]) -> list[str]:
    return [
        detail
        for sql in statements
        if sql.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "INSERT"))
        for *_, detail in db.execute("EXPLAIN QUERY PLAN " + sql)
    ]


def claim_steps(db: sqlite3.Connection, queue: str) -> int:
    """SQLite's VM steps (in hundreds) for one claim of 64, rolled back."""
    db.execute("BEGIN IMMEDIATE")
    try:
        steps, _ = traced(db, lambda: q.claim(db, queue, "measured", 64, 60.0))
    finally:
        db.execute("ROLLBACK")
    return steps


def test_a_claim_reads_the_same_rows_whatever_waits_behind_it(tmp_path: Path) -> None:
    """A claim holds the write lock: it must walk the index in claim order and stop after its
    rows, not read and sort the whole backlog (which shut the ingress out: 503)."""
    path = tmp_path / "q.sqlite3"
    db = sqlite_db.connect(path)
    try:
        q.declare(db, "deep", "deep.dlq", ("#",))
        backlog(path, "deep", 1_000)
        q.claim(db, "deep", "busy", 64, 600.0)  # a batch in flight: later claims pass it by
        small = claim_steps(db, "deep")
        backlog(path, "deep", 49_000)
        large = claim_steps(db, "deep")
    finally:
        db.close()
    assert large <= small * 1.5 + 10, f"{small}00 VM steps at 1,000 waiting, {large}00 at 50,000"


def test_no_statement_of_a_delivery_reads_the_backlog(tmp_path: Path) -> None:
    """What a publish, a claim and each settlement run: every one finds its rows through an
    index, none scans the messages or sorts them."""
    path = tmp_path / "q.sqlite3"
    db = sqlite_db.connect(path)
    try:
        q.declare(db, "deep", "deep.dlq", ("#",))
        backlog(path, "deep", 5_000)

        def deliveries() -> None:
            q.publish(db, [envelope_for(make_event("ONCRMDEALADD", {}))], "b24.unrouted")
            assert q.due(db, "deep")
            acked, retried, rejected = q.claim(db, "deep", "w1", 3, 60.0)
            q.heartbeat(db, "w1", "deep", "worker")
            q.renew(db, "w1", [acked.id, retried.id, rejected.id], 60.0)
            assert q.ack(db, acked, "w1")
            assert q.move(db, retried, "w1", queue="deep", headers={}, delay_s=10)
            assert q.move(db, rejected, "w1", queue="deep.dlq", headers={})
            q.release(db, "w1")
            q.leave(db, "w1")

        _, statements = traced(db, deliveries)
        found = plans(db, statements)
    finally:
        db.close()
    assert found, statements
    assert not [p for p in found if "TEMP B-TREE" in p or p.startswith("SCAN messages")], found


async def test_the_ingress_accepts_every_event_while_a_worker_drains_a_backlog(
    tmp_path: Path,
) -> None:
    """The default publish timeout (0.75 s), 200,000 events waiting, a worker draining them:
    every event posted meanwhile is stored and answered 200."""
    settings = load_settings(
        broker_url=f"sqlite:{tmp_path / 'queue.sqlite3'}",
        app_tokens=SAMPLE_TOKEN,
        sqlite_poll_s=0.02,
        shutdown_timeout_s=2,
    )
    handled = 0

    async def handle(self: EventConsumer, event: Event) -> None:
        nonlocal handled
        handled += 1

    cls = consumer("drained", handle, prefetch=64)
    await transport_for(settings).declare([cls])
    backlog(tmp_path / "queue.sqlite3", "drained", 200_000)
    statuses: list[int] = []
    async with (
        Worker(settings, [cls]),
        transport_for(settings).publisher("test") as sink,
        TestClient(
            TestServer(create_app(settings, sink, StaticTokens(settings.app_tokens)))
        ) as client,
    ):
        await wait_until(lambda: handled >= 64, 30, "the worker draining")

        async def post() -> None:
            resp = await client.post(
                "/b24/events",
                data=sample_form("crm-deal-add"),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            statuses.append(resp.status)

        before = handled
        for _ in range(20):  # 100 events, 5 at a time, at about 50 a second
            await asyncio.gather(*(post() for _ in range(5)))
            await asyncio.sleep(0.1)
        after = handled
    assert statuses == [200] * 100, collections.Counter(statuses)
    assert before < after < 200_000, "the posts came while the worker was draining the backlog"


def test_portals_whose_rows_all_wait_for_a_retry_cost_a_fair_claim_no_rounds(
    tmp_path: Path,
) -> None:
    """A downstream API down: thousands of portals' events wait for their retries beside one
    portal's flood. Those portals have nothing due: a fair claim must not give them turns (each
    would read nothing and the plan be made again, its statements growing with such portals)."""
    path = tmp_path / "q.sqlite3"
    db = sqlite_db.connect(path)
    fair = Fairness(on=True)
    try:
        q.declare(db, "fair", "fair.dlq", ("#",))
        backlog(path, "fair", 200)
        # The flood's portal sorts after the others: ties go to the name that sorts first.
        db.execute("UPDATE messages SET portal = 'zz-flood'")
        e = envelope_for(make_event("ONCRMDEALADD", {"FIELDS": {"ID": "1"}}))
        later = time.time() + 3600  # each waiting for a retry an hour away
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO messages (queue, message_id, routing_key, body, headers, timestamp, "
            "event_type, available_at, portal) VALUES ('fair', ?, ?, ?, '{}', ?, ?, ?, ?)",
            (
                (f"r{i}", e.routing_key, e.body, e.timestamp.isoformat(), e.event_type, later,
                 f"retrying{i:04d}")
                for i in range(500)
            ),
        )  # fmt: skip
        db.execute("COMMIT")
        db.execute("BEGIN IMMEDIATE")
        try:
            _, statements = traced(db, lambda: q.claim(db, "fair", "w", 1, 60.0, fair))
            [row] = q.claim(db, "fair", "w", 1, 60.0, fair)
        finally:
            db.execute("ROLLBACK")
    finally:
        db.close()
    assert row.message_id.startswith("backlog-")
    assert len(statements) <= 12, f"{len(statements)} statements for one slot"


def test_an_ordered_queue_keys_a_backlog_a_batch_at_a_time_and_polls_only_what_it_may_take(
    tmp_path: Path,
) -> None:
    """A backlog that arrived at once (one deal's events): a claim keys `STAMP_BATCH` of them,
    oldest first, and takes only keyed rows; idle workers' poll (`due`, a read) says nothing is
    ready while the key's first event is in a handler, so they do not take the write lock for
    nothing at each poll; it says there is while rows wait to be keyed."""
    from b24queue.ordering import Ordering, path_reader
    from b24queue.transports.sqlite.claims import STAMP_BATCH

    path = tmp_path / "q.sqlite3"
    ordering = Ordering(path_reader("data.FIELDS.ID"), True, "T")
    db = sqlite_db.connect(path)
    db.isolation_level = None
    try:
        q.declare(db, "o", "o.dlq", ("#",))
        backlog(path, "o", STAMP_BATCH + 500)  # deal 1, all of them
        assert q.due(db, "o", ordering)  # not keyed yet: a claim has work
        [first] = q.claim(db, "o", "w", 10, 60.0, None, ordering)
        assert first.message_id == "backlog-0"
        keyed = "SELECT count(*) FROM messages WHERE order_key IS NOT NULL"
        assert db.execute(keyed).fetchone()[0] == STAMP_BATCH
        assert q.due(db, "o", ordering)  # 500 still to key
        assert q.claim(db, "o", "w", 10, 60.0, None, ordering) == []  # keyed them; deal 1 busy
        assert db.execute(keyed).fetchone()[0] == STAMP_BATCH + 500
        assert not q.due(db, "o", ordering)  # all held back by the one in a handler
        assert q.due(db, "o")  # (without the order, 1,499 would be ready)
        assert q.ack(db, first, "w")
        assert q.due(db, "o", ordering)
        [second] = q.claim(db, "o", "w", 10, 60.0, None, ordering)
        assert second.message_id == "backlog-1"
    finally:
        db.close()


async def test_idle_runners_are_watched_by_one_reader_not_each_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle worker with 40 consumers: each runner polled its queue every
    `B24QUEUE_SQLITE_POLL_S` (2,000 reads a second here; 16% of a core with 100 consumers at the
    default); now one watch reads for all, and only when another process committed or once a
    second."""
    settings = settings_for(tmp_path)
    calls = collections.Counter[str]()
    for name in ("due", "due_among"):
        original = getattr(q, name)

        def counted(*args: Any, _f: Callable[..., Any] = original, _n: str = name) -> Any:
            calls[_n] += 1
            return _f(*args)

        monkeypatch.setattr(q, name, counted)

    async def handle(self: EventConsumer, event: Event) -> None:
        return None

    classes = [consumer(f"idle.q{i}", handle) for i in range(40)]
    async with Worker(settings, classes):
        await asyncio.sleep(0.5)  # every runner started and idle
        calls.clear()
        await asyncio.sleep(1.0)
        assert calls["due"] < 100 and calls["due_among"] <= 5, calls  # was ~2,000 "due"


async def test_an_event_another_process_commits_wakes_its_runner_through_the_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Committed by another connection (an ingress process): no in-process wake-up, and the
    runners' own look is made 30 s here, so only the watch (data_version) can find it soon."""
    from b24queue.transports.sqlite import runner

    monkeypatch.setattr(leased, "HEARTBEAT_S", 30.0)
    monkeypatch.setattr(runner, "HEARTBEAT_S", 30.0)
    settings = settings_for(tmp_path)
    seen: list[str] = []

    async def handle(self: EventConsumer, event: Event) -> None:
        seen.append(event.data["FIELDS"]["ID"])

    async with Worker(settings, [consumer("watched", handle)]):
        await asyncio.sleep(0.3)
        other = sqlite_db.connect(tmp_path / "queue.sqlite3")
        try:
            with other:
                event = envelope_for(make_event("ONCRMDEALADD", {"FIELDS": {"ID": "7"}}))
                q.publish(other, [event], settings.unrouted)
        finally:
            other.close()
        await wait_until(lambda: seen == ["7"], 5, "the event found by the watch")
