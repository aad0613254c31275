"""The queue database: schema, and one process's access to it.

WAL, `synchronous=FULL`: a commit is on disk before it returns. Every write of a process goes
through one thread and is group-committed: whatever arrived while the last transaction ran is
written in the next one, with one fsync (publishes, claims and settlements alike), so throughput
is not bounded by fsync latency. Reads use the same thread (SQLite connections are not shared
across threads here); other processes on the host (ingress, workers, the CLI) wait for the
write lock up to `BUSY_TIMEOUT_MS`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from weakref import WeakSet

from b24queue import _constants as c
from b24queue.errors import ConfigError
from b24queue.queues import MAX_PORTAL_CHARS
from b24queue.secrets.stores import SqliteFile, open_sqlite
from b24queue.transports.kit.batching import Batcher

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 4  # 2: messages.fence; 3: messages.portal, portal_turns, queue_clocks;
# 4: messages.order_key
BUSY_TIMEOUT_MS = 5000
_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # kind: consumer, dlq or unrouted
    "CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY, kind TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS bindings (queue TEXT NOT NULL, pattern TEXT NOT NULL, "
    "PRIMARY KEY (queue, pattern))",
    # portal: the event's member_id (`queues.portal_key`), "" for none: what fair claims share by
    """CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        message_id TEXT NOT NULL,
        routing_key TEXT NOT NULL,
        body BLOB NOT NULL,
        headers TEXT NOT NULL,
        timestamp TEXT NOT NULL,
        event_type TEXT NOT NULL,
        available_at REAL NOT NULL,
        lease_owner TEXT,
        lease_until REAL,
        deliveries INTEGER NOT NULL DEFAULT 0,
        fence INTEGER NOT NULL DEFAULT 0,
        portal TEXT NOT NULL DEFAULT '',
        order_key TEXT
    )""",
    # The unrouted queue's events and body bytes, changed with every write to it: its cap is
    # checked without counting it (`queue.publish`).
    "CREATE TABLE IF NOT EXISTS queue_sizes (queue TEXT PRIMARY KEY, events INTEGER NOT NULL, "
    "bytes INTEGER NOT NULL)",
    # Workers say they are alive here (what `status` counts as consumers).
    "CREATE TABLE IF NOT EXISTS workers (owner TEXT PRIMARY KEY, queue TEXT NOT NULL, "
    "name TEXT NOT NULL, seen_at REAL NOT NULL)",
    # Fair claims' turns (b24queue.transports.kit.fair): each portal's pass, each queue's clock.
    "CREATE TABLE IF NOT EXISTS portal_turns (queue TEXT NOT NULL, portal TEXT NOT NULL, "
    "pass REAL NOT NULL, PRIMARY KEY (queue, portal))",
    "CREATE TABLE IF NOT EXISTS queue_clocks (queue TEXT PRIMARY KEY, clock REAL NOT NULL)",
)
# Created at every open, after any upgrade: a file from any version has them.
_INDEXES = (
    # Claims walk a queue in due order: the rows being handled first (few: prefetch per
    # worker), then the due ones; those waiting for a retry are past the range read.
    "CREATE INDEX IF NOT EXISTS messages_due ON messages (queue, available_at, id)",
    # Fair claims: the portals of a queue (one probe each), and a portal's rows in due order.
    "CREATE INDEX IF NOT EXISTS messages_portal ON messages (queue, portal, available_at, id)",
    # A worker's heartbeat finds the rows it holds by owner.
    "CREATE INDEX IF NOT EXISTS messages_leased ON messages (lease_owner) "
    "WHERE lease_owner IS NOT NULL",
    # Ordered claims (b24queue.ordering): a group's rows in the order accepted, and (order_key
    # NULL) the rows no claim has keyed yet, in that order.
    "CREATE INDEX IF NOT EXISTS messages_order ON messages (queue, order_key, id)",
)
# From schema 2: each row's portal from its headers (what the ingress put there), "" for none.
_BACKFILL_PORTAL = (
    "UPDATE messages SET portal = substr(coalesce(json_extract(headers, ?), ''), 1, ?) "
    "WHERE instr(headers, ?) > 0"
)

Op = Callable[[sqlite3.Connection], Any]


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if need be) the queue database: private, WAL, fsync at every commit
    (b24queue.secrets.stores.open_sqlite), its schema in place, upgraded if older."""
    return open_sqlite(path, lambda db: _create(db, path), timeout_s=BUSY_TIMEOUT_MS / 1000)


def _create(db: sqlite3.Connection, path: Path) -> None:
    with db:
        db.execute("BEGIN IMMEDIATE")
        for statement in _TABLES:
            db.execute(statement)
        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise ConfigError(
                f"{path} has queue schema {row[0]}, newer than this b24queue knows "
                f"({SCHEMA_VERSION}): upgrade b24queue"
            )
        elif int(row[0]) < SCHEMA_VERSION:
            _upgrade(db, int(row[0]))
        for statement in _INDEXES:
            db.execute(statement)


def _upgrade(db: sqlite3.Connection, version: int) -> None:
    """In place, in the opening transaction: the rows waiting stay, each one's claims and turns
    start anew."""
    if version == 1:  # before the fence column
        db.execute("ALTER TABLE messages ADD COLUMN fence INTEGER NOT NULL DEFAULT 0")
    if version < 3:  # before the portal column
        db.execute("ALTER TABLE messages ADD COLUMN portal TEXT NOT NULL DEFAULT ''")
        member = c.H_MEMBER_ID
        db.execute(_BACKFILL_PORTAL, (f'$."{member}"', MAX_PORTAL_CHARS, member))
    # Before order keys: every row NULL, keyed by the first ordered claim that meets it.
    db.execute("ALTER TABLE messages ADD COLUMN order_key TEXT")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))


class Database(SqliteFile):
    """One process's connection, on one thread, with group-committed writes. An async context
    manager; `write(op)` returns once the transaction holding `op` is committed."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "b24queue-sqlite")
        # Every op waiting, in one transaction; a failure of the whole (a full disk, a lock held
        # past the timeout) fails them all, never retried one by one.
        self._writes: Batcher[Op, tuple[bool, Any]] = Batcher(
            self._commit, "b24queue-sqlite-writer", (Exception,), max_batch=None
        )
        # Told after each commit, in the event loop (wakes this process's runners at once).
        self.committed = asyncio.Event()

    def _open(self) -> sqlite3.Connection:
        return connect(self.path)

    async def __aenter__(self) -> Database:
        await self._run(self._conn)
        self._writes.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._writes.stop("the queue database is closed")
        await self.close()

    async def read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        assert self._db is not None, "use `async with Database(...)`"
        return await self._run(op, self._db)

    async def write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        # A caller that gave up (a publish past its timeout) is not written for: it has been
        # answered 503, and its event must not appear later.
        ok, value = await self._writes.submit(op)
        if not ok:
            raise value
        result: T = value
        return result

    async def _commit(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        try:
            outcomes = await self._run(self._transaction, ops)
        except Exception as exc:
            log.error("queue database write failed: %r", exc)
            raise
        self.committed.set()
        self.committed.clear()
        return outcomes

    def _transaction(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        """All ops in one transaction (one fsync), each in a savepoint of its own: an op that
        fails is undone alone and only its caller hears of it."""
        db = self._db
        assert db is not None
        outcomes: list[tuple[bool, Any]] = []
        with db:
            db.execute("BEGIN IMMEDIATE")
            for op in ops:
                db.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, op(db)))
                except Exception as exc:
                    db.execute("ROLLBACK TO op")
                    outcomes.append((False, exc))
                db.execute("RELEASE op")
        return outcomes


# Runners of this process, per database file: woken at once by this process's publishes.
_LISTENERS: dict[str, WeakSet[asyncio.Event]] = {}


def notify(path: Path) -> None:
    for event in list(_LISTENERS.get(str(path.resolve()), ())):
        event.set()


def listen(path: Path) -> asyncio.Event:
    event = asyncio.Event()
    _LISTENERS.setdefault(str(path.resolve()), WeakSet()).add(event)
    return event
