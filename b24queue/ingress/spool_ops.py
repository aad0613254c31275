"""`b24queue spool`: what the ingress spools hold on this host, and the quarantined events in
them (moved aside because the broker refused them, or because they broke the connection).

Works beside a running ingress (SQLite in WAL mode; each write waits for the other's lock):
`list` only reads; `replay` publishes each quarantined event with a confirm, then deletes it
(a crash between the two duplicates, never loses); `drop` deletes chosen ones for good.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from b24queue.errors import BrokerUnavailableError, PublishError
from b24queue.events.envelope import Envelope
from b24queue.ingress.spool import envelope_of, spool_files
from b24queue.secrets.redaction import redact
from b24queue.settings import Settings
from b24queue.transports import Publisher, connection_name, transport_for
from b24queue.transports.status import SpoolRow

_ROW = "id, message_id, routing_key, length(body), spooled_at, reason, quarantined_at"


@dataclass(frozen=True, slots=True)
class Quarantined:
    """One event set aside; never its body (it carries tokens)."""

    file: str
    id: int
    message_id: str
    event: str
    size_bytes: int
    spooled_at: str
    reason: str
    quarantined_at: str


def _open(path: str | Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    db.execute("PRAGMA busy_timeout=5000")
    return db


def _has_quarantine(db: sqlite3.Connection) -> bool:
    row = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'quarantine'"
    ).fetchone()
    return row is not None


def files(settings: Settings) -> list[SpoolRow]:
    """Every spool file of the configured path (one per ingress process slot) that exists."""
    found = []
    for path in spool_files(Path(settings.spool_path)):
        db = _open(path)
        try:
            waiting = int(db.execute("SELECT count(*) FROM spool").fetchone()[0])
            held = 0
            if _has_quarantine(db):
                held = int(db.execute("SELECT count(*) FROM quarantine").fetchone()[0])
        finally:
            db.close()
        found.append(SpoolRow(str(path), waiting, held))
    return found


def quarantined(spools: list[SpoolRow], limit: int | None = None) -> list[Quarantined]:
    """The quarantined events of these spool files (`files`), oldest first in each file; reads
    them in pieces."""
    out: list[Quarantined] = []
    for spool in spools:
        if not spool.quarantined:
            continue
        db = _open(spool.path)
        try:
            for row in db.execute(f"SELECT {_ROW} FROM quarantine ORDER BY id"):  # noqa: S608
                out.append(Quarantined(str(spool.path), *row))
                if limit is not None and len(out) >= limit:
                    return out
        finally:
            db.close()
    return out


def drop(settings: Settings, message_ids: set[str]) -> int:
    """Delete the quarantined events with these message ids for good; returns how many."""
    dropped = 0
    for spool in files(settings):
        if not spool.quarantined:
            continue
        db = _open(spool.path)
        try:
            for message_id in message_ids:
                dropped += db.execute(
                    "DELETE FROM quarantine WHERE message_id = ?", (message_id,)
                ).rowcount
        finally:
            db.close()
    return dropped


@dataclass(frozen=True, slots=True)
class ReplayResult:
    replayed: int
    refused: list[tuple[str, str]]  # (message_id, why)


async def replay(settings: Settings, message_ids: set[str] | None = None) -> ReplayResult:
    """Publish quarantined events (all, or those with these ids) to the queue, each deleted once
    the queue has it (RabbitMQ confirmed it, PostgreSQL committed it). One still refused stays,
    with the reason."""
    replayed = 0
    refused: list[tuple[str, str]] = []
    async with transport_for(settings).publisher(connection_name("spool-replay")) as publisher:
        await _until_ready(publisher, settings)
        for spool in files(settings):
            if not spool.quarantined:
                continue
            db = _open(spool.path)
            try:
                for row_id, envelope in _envelopes(db, message_ids):
                    try:
                        await publisher.publish(envelope)
                    except PublishError as exc:
                        refused.append((envelope.message_id, redact(str(exc))))
                        continue
                    db.execute("DELETE FROM quarantine WHERE id = ?", (row_id,))
                    replayed += 1
            finally:
                db.close()
    return ReplayResult(replayed, refused)


async def _until_ready(publisher: Publisher, settings: Settings) -> None:
    async def connected() -> None:
        while not publisher.is_ready():  # noqa: ASYNC110 - the seam has is_ready(), no event
            await asyncio.sleep(0.05)

    ready = asyncio.ensure_future(connected())
    failed = asyncio.ensure_future(publisher.failed())
    done, pending = await asyncio.wait(
        {ready, failed}, timeout=settings.connect_timeout_s, return_when=asyncio.FIRST_COMPLETED
    )
    for task in pending:
        task.cancel()
    if failed in done:
        raise failed.result()
    if ready not in done:
        where = settings.redacted_broker_url()
        raise BrokerUnavailableError(
            f"{where} did not answer within {settings.connect_timeout_s:g}s"
        )


def _envelopes(
    db: sqlite3.Connection, message_ids: set[str] | None
) -> Iterator[tuple[int, Envelope]]:
    """One row at a time (bodies are up to a request's size each)."""
    last = -1
    while True:
        row = db.execute(
            "SELECT id, message_id, routing_key, body, headers, timestamp, event_type "
            "FROM quarantine WHERE id > ? ORDER BY id LIMIT 1",
            (last,),
        ).fetchone()
        if row is None:
            return
        last = row[0]
        if message_ids is not None and row[1] not in message_ids:
            continue
        yield row[0], envelope_of(row)
