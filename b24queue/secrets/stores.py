"""Where b24queue keeps state of its own beside the broker (the portal store, its buckets and
leases, the ingress's spool, the embedded queue, consumers' seen keys): a SQLite file of ours or
a Redis of ours, and which of the two a store's spec names. No client library at import: Redis is
imported when a client is first made (`pip install b24queue[redis]`)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from b24queue.errors import ConfigError
from b24queue.secrets.files import private_file
from b24queue.secrets.redaction import redact_url

if TYPE_CHECKING:
    from redis.asyncio import Redis

T = TypeVar("T")

# How a store's spec (B24QUEUE_PORTAL_STORE) names Redis; `sqlite:PATH` names a file.
REDIS_URL_PREFIXES = ("redis://", "rediss://", "unix://")


def store_at(spec: str) -> Path | str:
    """The SQLite file a `sqlite:PATH` spec names, or a Redis URL as it is; `ConfigError` (the
    spec shown without its password) for anything else."""
    if spec.startswith(REDIS_URL_PREFIXES):
        return spec
    if spec.startswith("sqlite:"):
        return Path(spec.removeprefix("sqlite:"))
    raise ConfigError(
        f"B24QUEUE_PORTAL_STORE: {redact_url(spec)!r} is neither sqlite:PATH nor "
        "redis://HOST:PORT/DB"
    )


def open_sqlite(
    path: Path,
    schema: Callable[[sqlite3.Connection], object],
    *,
    synchronous: str = "FULL",
    timeout_s: float = 5.0,
) -> sqlite3.Connection:
    """Open a SQLite file of ours, created if need be: private (`files.private_file`:
    0600, never through a symbolic link, never another user's), in autocommit (callers open their
    own transactions), WAL, `synchronous` FULL (an fsync at every commit) unless asked less, other
    processes' write locks waited for up to `timeout_s`; then `schema(connection)` puts the
    tables in place. Closed again if any of it fails."""
    private_file(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout_s)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        schema(db)
    except BaseException:
        db.close()
        raise
    return db


class SqliteFile:
    """A store in a SQLite file of ours: one connection (`_open`, at first use), on one thread of
    its own where every statement runs, in order; `close` closes both."""

    def __init__(self, path: Path, thread_name: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)

    def _open(self) -> sqlite3.Connection:
        """The connection (`open_sqlite` with the store's schema); on the store's thread."""
        raise NotImplementedError

    def _conn(self) -> sqlite3.Connection:
        """The connection, opened at first use; on the store's thread only."""
        if self._db is None:
            self._db = self._open()
        return self._db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close)
        self._thread.shutdown(wait=True)


class RedisClient:
    """A store in Redis: its client made at first use (a constructor does no I/O), closed by
    `close`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: Redis | None = None

    def _redis(self) -> Redis:
        if self._client is None:
            from redis.asyncio import Redis

            self._client = Redis.from_url(self.url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
