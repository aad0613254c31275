"""A local durable spool for events the broker cannot take right now (SQLite, WAL, fsync'd).

Bitrix24 does not resend an event we answer 503 for, so while RabbitMQ is down or blocked the
ingress writes accepted events here, answers 200, and a forwarder moves them to RabbitMQ (with
confirms) once it is back, deleting each only after its confirm. A crash between publish and
delete duplicates an event; nothing in here is lost unless the disk is.

Writes are group-committed: concurrent puts share one transaction and one fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from b24queue.envelope import Envelope
from b24queue.errors import B24QueueError

log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    body BLOB NOT NULL,
    headers TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    event_type TEXT NOT NULL,
    spooled_at TEXT NOT NULL
)
"""


class SpoolFullError(B24QueueError):
    """The spool holds its maximum: the event cannot be made durable."""


class Spool:
    def __init__(self, path: Path, max_events: int) -> None:
        self.path = path
        self.max_events = max_events
        self.not_empty = asyncio.Event()
        self._count = 0
        self._db: sqlite3.Connection | None = None
        # One thread owns the SQLite connection: every statement runs there, in order.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="b24queue-spool")
        self._pending: list[tuple[Envelope, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        return self._count

    def has_room(self) -> bool:
        return self._count + len(self._pending) < self.max_events

    async def __aenter__(self) -> Spool:
        self._count = await self._run(self._open)
        if self._count:
            log.warning("spool %s holds %d event(s) not yet in RabbitMQ", self.path, self._count)
            self.not_empty.set()
        self._writer = asyncio.create_task(self._write_loop(), name="b24queue-spool-writer")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        for _, future in self._pending:
            if not future.done():
                future.set_exception(SpoolFullError("spool closed"))
        await self._run(self._close)
        self._thread.shutdown(wait=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _open(self) -> int:
        db = self._db = _connect(self.path)
        return int(db.execute("SELECT count(*) FROM spool").fetchone()[0])

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def put(self, envelope: Envelope) -> None:
        """Return once the event is on disk (fsync'd); `SpoolFullError` if there is no room."""
        if not self.has_room():
            raise SpoolFullError(f"spool is full ({self.max_events} events)")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((envelope, future))
        self._wake.set()
        await future

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                await self._run(self._insert, [e for e, _ in batch])
            except Exception as exc:  # a disk error fails these puts (503), not the process
                log.error("spool write failed: %r", exc)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(SpoolFullError(f"spool write failed: {exc!r}"))
                continue
            self._count += len(batch)
            self.not_empty.set()
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    def _insert(self, envelopes: list[Envelope]) -> None:
        assert self._db is not None
        now = datetime.now(UTC).isoformat()
        rows = [
            (
                e.message_id,
                e.routing_key,
                e.body,
                json.dumps(e.headers),
                e.timestamp.isoformat(),
                e.event_type,
                now,
            )
            for e in envelopes
        ]
        with self._db:  # one transaction, one fsync
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO spool (message_id, routing_key, body, headers, timestamp, "
                "event_type, spooled_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    async def oldest(self, limit: int) -> list[tuple[int, Envelope]]:
        rows: list[tuple[Any, ...]] = await self._run(self._select, limit)
        return [
            (
                row[0],
                Envelope(
                    message_id=row[1],
                    routing_key=row[2],
                    body=bytes(row[3]),
                    headers=json.loads(row[4]),
                    timestamp=datetime.fromisoformat(row[5]),
                    event_type=row[6],
                ),
            )
            for row in rows
        ]

    def _select(self, limit: int) -> list[tuple[Any, ...]]:
        assert self._db is not None
        return self._db.execute(
            "SELECT id, message_id, routing_key, body, headers, timestamp, event_type "
            "FROM spool ORDER BY id LIMIT ?",
            (limit,),
        ).fetchall()

    async def delete(self, ids: list[int]) -> None:
        if not ids:
            return
        await self._run(self._delete, ids)
        self._count -= len(ids)
        if self._count <= 0 and not self._pending:
            self._count = 0
            self.not_empty.clear()

    def _delete(self, ids: list[int]) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])


def _connect(path: Path) -> sqlite3.Connection:
    """A spool database, created if need be: WAL, fsync at every commit (a 200 must survive a
    crash), the table in place. Autocommit: callers open their own transactions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


def slot_path(path: Path, slot: int) -> Path:
    """The spool file of ingress process `slot`: slot 0 keeps the configured path, so a single
    process and the first of several share it; the others get `spool.<slot>.sqlite3`."""
    return path if slot == 0 else path.with_name(f"{path.stem}.{slot}{path.suffix}")


def stray_spools(path: Path, keep: int) -> list[Path]:
    """Spool files of process slots >= `keep` (left from a run with more processes)."""
    pattern = re.compile(re.escape(path.stem) + r"\.([0-9]+)" + re.escape(path.suffix) + "$")
    found = []
    if path.parent.is_dir():
        for candidate in path.parent.iterdir():
            match = pattern.match(candidate.name)
            if match and int(match.group(1)) >= keep:
                found.append(candidate)
    return sorted(found)


def merge_stray_spools(path: Path, keep: int) -> int:
    """Move the events of stray spool files into the spool at `path` (one transaction each, then
    the file goes), so no spooled event is stranded when the ingress runs fewer processes. Call
    it only while no ingress process runs. Returns how many events moved."""
    strays = stray_spools(path, keep)
    if not strays:
        return 0
    db = _connect(path)
    moved = 0
    try:
        for stray in strays:
            db.execute("ATTACH DATABASE ? AS stray", (str(stray),))
            try:
                db.execute(_SCHEMA.replace("spool (", "stray.spool (", 1))
                with db:
                    db.execute("BEGIN IMMEDIATE")
                    cursor = db.execute(
                        "INSERT INTO spool (message_id, routing_key, body, headers, timestamp, "
                        "event_type, spooled_at) SELECT message_id, routing_key, body, headers, "
                        "timestamp, event_type, spooled_at FROM stray.spool ORDER BY id"
                    )
                    moved += max(cursor.rowcount, 0)
            finally:
                db.execute("DETACH DATABASE stray")
            for suffix in ("", "-wal", "-shm"):
                Path(f"{stray}{suffix}").unlink(missing_ok=True)
            log.warning("moved the events of %s into %s", stray, path)
    finally:
        db.close()
    return moved
