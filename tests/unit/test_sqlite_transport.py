"""The SQLite transport's own traps (no broker): a locked database, a handler outliving its
lease, a stop during a claim, one failing write in a batch, DLQ order, unrouted replay, a failed
start. The shared scenarios are in tests/conformance/."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from b24queue import Event, EventConsumer, Reject
from b24queue.envelope import envelope_for
from b24queue.runtime import Worker
from b24queue.settings import Settings, load_settings
from b24queue.testing import make_event
from b24queue.transports import leased, transport_for
from b24queue.transports.sqlite import db as sqlite_db
from b24queue.transports.sqlite.db import Database
from tests.integration.conftest import wait_until


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


def test_a_version_1_queue_file_gains_the_fence_column(tmp_path: Path) -> None:
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
        assert "fence" in columns
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == "2"
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
