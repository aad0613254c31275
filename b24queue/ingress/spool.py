"""A local durable spool for events the broker cannot take right now (SQLite, WAL, fsync'd).

Bitrix24 does not resend an event we answer 503 for, so while RabbitMQ is down or blocked the
ingress writes accepted events here, answers 200, and a forwarder moves them to RabbitMQ (with
confirms) once it is back, deleting each only after its confirm. A crash between publish and
delete duplicates an event; nothing in here is lost unless the disk is.

Writes are group-committed: concurrent puts share one transaction and one fsync.

A spooled event that fails for a reason of its own (the broker refuses that message, or publishing
it alone breaks the connection again and again) is moved aside into the `quarantine` table of the
same file: kept, counted, shown by `b24queue spool list` and `status`, replayable with
`b24queue spool replay`, and never left at the head of the line.

Files are private (0600: bodies carry access tokens). Each open spool holds an exclusive lock on
`<file>.lock`, so two ingress processes never share a spool, and merging skips a stray file that a
running process still owns. A spool file is only ever read if only we could have written it (ours,
0600, not a symbolic link: b24queue.secrets.files), so a file another user planted in a shared
folder is never merged, listed or replayed, and is named in a warning instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from b24queue.errors import ConfigError, SpoolFullError
from b24queue.events.envelope import Envelope
from b24queue.secrets.files import NotPrivateError, open_private, private_file, side_files
from b24queue.secrets.redaction import redact
from b24queue.secrets.stores import SqliteFile, open_sqlite

log = logging.getLogger(__name__)

# A spooled event's columns (`_COLUMNS`): in the spool, and in quarantine with why and when.
_ROW = """
    message_id TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    body BLOB NOT NULL,
    headers TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    event_type TEXT NOT NULL,
    spooled_at TEXT NOT NULL"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,{_ROW}
)
"""
_QUARANTINE_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,{_ROW},
    reason TEXT NOT NULL,
    quarantined_at TEXT NOT NULL
)
"""
_COLUMNS = "message_id, routing_key, body, headers, timestamp, event_type, spooled_at"
MAX_REASON_CHARS = 500


class SpoolInUseError(ConfigError):
    """Another process holds this spool file (two ingresses configured with one spool path)."""


class SpoolLock:
    """An exclusive, non-blocking lock on `<spool>.lock` (released when closed or when the
    process dies, so a crashed ingress never leaves it taken)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(f"{path}.lock")
        self._fd: int | None = None

    def acquire(self) -> bool:
        private_file(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_spool(path: Path) -> SpoolLock:
    lock = SpoolLock(path)
    if not lock.acquire():
        raise SpoolInUseError(
            f"spool {path} is in use by another ingress process (pid {lock.holder()}); give each "
            "ingress its own B24QUEUE_SPOOL_PATH"
        )
    return lock


class Spool(SqliteFile):
    def __init__(self, path: Path, max_events: int) -> None:
        super().__init__(path, "b24queue-spool")
        self.max_events = max_events
        self.not_empty = asyncio.Event()
        self._count = 0
        self.quarantined = 0
        self._lock: SpoolLock | None = None
        self._pending: list[tuple[Envelope, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        return self._count

    def has_room(self) -> bool:
        return self._count + len(self._pending) < self.max_events

    async def __aenter__(self) -> Spool:
        self._lock = lock_spool(self.path)
        try:
            self._count, self.quarantined = await self._run(self._counts)
        except BaseException:
            self._lock.release()
            raise
        if self.quarantined:
            log.warning(
                "spool %s holds %d quarantined event(s): see `b24queue spool list`",
                self.path,
                self.quarantined,
            )
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
        await self.close()
        if self._lock is not None:
            self._lock.release()

    def _open(self) -> sqlite3.Connection:
        return _connect(self.path)

    def _counts(self) -> tuple[int, int]:
        db = self._conn()
        count = int(db.execute("SELECT count(*) FROM spool").fetchone()[0])
        return count, int(db.execute("SELECT count(*) FROM quarantine").fetchone()[0])

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
        rows = [(*e.stored(), now) for e in envelopes]
        with self._db:  # one transaction, one fsync
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO spool (message_id, routing_key, body, headers, timestamp, "
                "event_type, spooled_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    async def oldest(self, limit: int) -> list[tuple[int, Envelope]]:
        rows: list[tuple[Any, ...]] = await self._run(self._select, limit)
        return [(row[0], envelope_of(row)) for row in rows]

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

    async def quarantine(self, row_id: int, reason: str) -> None:
        """Move a spooled event aside (kept, not forwarded) in one transaction; the reason is
        kept without a secret."""
        if await self._run(self._quarantine, row_id, redact(reason)[:MAX_REASON_CHARS]):
            self.quarantined += 1
            self._count -= 1
            if self._count <= 0 and not self._pending:
                self._count = 0
                self.not_empty.clear()

    def _quarantine(self, row_id: int, reason: str) -> int:
        assert self._db is not None
        now = datetime.now(UTC).isoformat()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            moved = self._db.execute(
                f"INSERT INTO quarantine (id, {_COLUMNS}, reason, quarantined_at) "  # noqa: S608
                f"SELECT id, {_COLUMNS}, ?, ? FROM spool WHERE id = ?",
                (reason, now, row_id),
            ).rowcount
            self._db.execute("DELETE FROM spool WHERE id = ?", (row_id,))
        return moved


def envelope_of(row: tuple[Any, ...]) -> Envelope:
    """A spooled (or quarantined) row `id, message_id, routing_key, body, headers, timestamp,
    event_type` as the envelope it was."""
    return Envelope(
        message_id=row[1],
        routing_key=row[2],
        body=bytes(row[3]),
        headers=json.loads(row[4]),
        timestamp=datetime.fromisoformat(row[5]),
        event_type=row[6],
    )


def _connect(path: Path) -> sqlite3.Connection:
    """A spool database, created if need be (`stores.open_sqlite`: private, WAL, fsync
    at every commit: a 200 must survive a crash), the tables in place; other processes' locks
    waited for 5 s (`b24queue spool` may read it meanwhile)."""
    return open_sqlite(path, _create, timeout_s=5.0)


def _create(db: sqlite3.Connection) -> None:
    db.execute(_SCHEMA)
    db.execute(_QUARANTINE_SCHEMA)


def slot_path(path: Path, slot: int) -> Path:
    """The spool file of ingress process `slot`: slot 0 keeps the configured path, so a single
    process and the first of several share it; the others get `spool.<slot>.sqlite3`."""
    return path if slot == 0 else path.with_name(f"{path.stem}.{slot}{path.suffix}")


def spool_files(path: Path) -> list[Path]:
    """Every existing spool file of `path` that is ours to read: slot 0's, then each other
    slot's."""
    return ([path] if readable_spool(path) else []) + stray_spools(path, keep=1)


def stray_spools(path: Path, keep: int) -> list[Path]:
    """Spool files of process slots >= `keep` (left from a run with more processes) that are
    ours to read."""
    pattern = re.compile(re.escape(path.stem) + r"\.([0-9]+)" + re.escape(path.suffix) + "$")
    found = []
    if path.parent.is_dir():
        for candidate in path.parent.iterdir():
            match = pattern.match(candidate.name)
            if match and int(match.group(1)) >= keep:
                found.append(candidate)
    return [p for p in sorted(found) if readable_spool(p)]


def readable_spool(path: Path) -> bool:
    """True for an existing spool file that only we could have written, and its side files
    (b24queue.secrets.files.open_private); False, with a warning naming it and why, for one another
    user could have written (planted in a shared folder: its events may be forged)."""
    for name in (path, *side_files(path)):
        try:
            os.close(open_private(name))
        except FileNotFoundError:
            if name == path:
                return False
        except NotPrivateError as exc:
            _skipped(path, exc)
            return False
    return True


def _skipped(path: Path, exc: NotPrivateError) -> None:
    which = "it" if exc.path == path else exc.path.name  # or its -wal, -shm, .lock
    log.warning(
        "spool file %s skipped, its events neither merged nor replayed: %s %s", path, which, exc.why
    )


def merge_stray_spools(path: Path, keep: int) -> int:
    """Move the events of stray spool files into the spool at `path` (one transaction each, then
    the file goes), so no spooled event is stranded when the ingress runs fewer processes.

    Locked: the spool at `path` must be free (else `SpoolInUseError`: another ingress runs in
    this directory), and a stray file still locked by a running process is left alone.
    Returns how many events moved (quarantined ones included)."""
    strays = stray_spools(path, keep)
    if not strays:
        return 0
    target = lock_spool(path)
    try:
        return sum(_merge_one(path, stray) for stray in strays)
    finally:
        target.release()


def _merge_one(path: Path, stray: Path) -> int:
    lock = SpoolLock(stray)
    try:
        if not lock.acquire():
            log.warning("spool %s is in use by process %s: not merged", stray, lock.holder())
            return 0
    except NotPrivateError as exc:  # its lock file is a link, or another user's
        _skipped(stray, exc)
        return 0
    try:
        return _merge_locked(path, stray)
    finally:
        lock.path.unlink(missing_ok=True)  # while still held: no one can take the old file
        lock.release()


def _merge_locked(path: Path, stray: Path) -> int:
    # Checked on a descriptor held until the merge is done; SQLite opens the file by its name,
    # so the name must still lead to the file checked once it has (else it was replaced).
    try:
        fd = open_private(stray)
    except FileNotFoundError:
        return 0
    except NotPrivateError as exc:
        _skipped(stray, exc)
        return 0
    try:
        checked = os.fstat(fd)
        return _merge_checked(path, stray, (checked.st_dev, checked.st_ino))
    finally:
        os.close(fd)


def _merge_checked(path: Path, stray: Path, identity: tuple[int, int]) -> int:
    if not readable_spool(stray):  # its side files too
        return 0
    db = _connect(path)
    try:
        db.execute("ATTACH DATABASE ? AS stray", (str(stray),))
        try:
            now = os.stat(stray, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != identity:
                log.warning("spool file %s was replaced while being merged: skipped", stray)
                return 0
            moved = _move_attached(db)
        finally:
            db.execute("DETACH DATABASE stray")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{stray}{suffix}").unlink(missing_ok=True)
        log.warning("moved the events of %s into %s", stray, path)
        return max(moved, 0)
    finally:
        db.close()


def _move_attached(db: sqlite3.Connection) -> int:
    db.execute(_SCHEMA.replace("spool (", "stray.spool (", 1))
    db.execute(_QUARANTINE_SCHEMA.replace("quarantine (", "stray.quarantine (", 1))
    with db:
        db.execute("BEGIN IMMEDIATE")
        moved: int = db.execute(
            f"INSERT INTO spool ({_COLUMNS}) "  # noqa: S608
            f"SELECT {_COLUMNS} FROM stray.spool ORDER BY id"
        ).rowcount
        moved += db.execute(
            f"INSERT INTO quarantine ({_COLUMNS}, reason, quarantined_at) "  # noqa: S608
            f"SELECT {_COLUMNS}, reason, quarantined_at FROM stray.quarantine ORDER BY id"
        ).rowcount
    return moved
