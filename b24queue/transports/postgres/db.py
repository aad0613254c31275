"""The queue's schema in PostgreSQL, connections to it, group commit and wake-ups.

Every connection says who it is (`application_name`: the connection name operators see in
`pg_stat_activity`) and commits synchronously: a commit has returned only once PostgreSQL has it
in its write-ahead log on disk, whatever the server's or the role's default says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from b24queue import _constants as c
from b24queue.errors import BrokerUnavailableError, ConfigError
from b24queue.queues import MAX_PORTAL_CHARS
from b24queue.settings import Settings

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4  # 2: queue_sizes; 3: messages.portal, portal_turns, queue_clocks;
# 4: messages.order_key
# A connection of our own or one lent by a pool.
Db: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"
# Errors that mean "the database is away or was restarted", as opposed to a bad statement.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # a connection left mid-operation by a failure
    asyncpg.exceptions.PostgresConnectionError,
    # a terminated backend, a server shutting down or starting, a canceled statement
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
    TimeoutError,
)


def schema_statements(schema: str) -> list[str]:
    s = f'"{schema}"'
    return [
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL)",
        # kind: consumer, dlq or unrouted
        f"CREATE TABLE IF NOT EXISTS {s}.queues (name text PRIMARY KEY, kind text NOT NULL)",
        # regex: a pattern with wildcards as a regular expression over '.' || routing_key
        # (routing in SQL); '' for an exact name, matched by equality
        f"CREATE TABLE IF NOT EXISTS {s}.bindings (queue text NOT NULL, pattern text NOT NULL, "
        "regex text NOT NULL, PRIMARY KEY (queue, pattern))",
        f"""CREATE TABLE IF NOT EXISTS {s}.messages (
            id bigserial PRIMARY KEY,
            queue text NOT NULL,
            message_id text NOT NULL,
            routing_key text NOT NULL,
            body bytea NOT NULL,
            headers text NOT NULL,
            stamp timestamptz NOT NULL,
            event_type text NOT NULL,
            available_at timestamptz NOT NULL DEFAULT now(),
            lease_owner text,
            lease_until timestamptz,
            deliveries integer NOT NULL DEFAULT 0,
            fence bigint NOT NULL DEFAULT 0,
            portal text NOT NULL DEFAULT '',
            order_key text
        ) WITH (fillfactor = 80)""",
        # Claims read a queue in due order: the rows being handled first (few: prefetch per
        # worker), then the due ones; those waiting for a retry are past the range scanned.
        f"CREATE INDEX IF NOT EXISTS messages_due ON {s}.messages (queue, available_at, id)",
        # A worker's heartbeat finds the rows it holds by owner.
        f"CREATE INDEX IF NOT EXISTS messages_leased ON {s}.messages (lease_owner) "
        "WHERE lease_owner IS NOT NULL",
        f"CREATE TABLE IF NOT EXISTS {s}.workers (owner text PRIMARY KEY, queue text NOT NULL, "
        "name text NOT NULL, seen_at timestamptz NOT NULL)",
        *_sizes(s),
        *_turns(s),
        *_order(s),
    ]


def _sizes(s: str) -> list[str]:
    # The unrouted queue's events and body bytes, changed with every write to it: its cap is
    # checked without counting it (`Queries.publish`).
    return [
        f"CREATE TABLE IF NOT EXISTS {s}.queue_sizes (queue text PRIMARY KEY, "
        "events bigint NOT NULL, bytes bigint NOT NULL)"
    ]


def _turns(s: str) -> list[str]:
    # portal: each row's member_id (`queues.portal_key`), "" for none; fair claims read a queue's
    # portals (one probe each) and a portal's rows in due order by this index, and keep their
    # turns (b24queue.transports.kit.fair) in the two tables.
    return [
        f"CREATE INDEX IF NOT EXISTS messages_portal ON {s}.messages "
        "(queue, portal, available_at, id)",
        f"CREATE TABLE IF NOT EXISTS {s}.portal_turns (queue text NOT NULL, portal text NOT NULL, "
        "pass double precision NOT NULL, PRIMARY KEY (queue, portal))",
        f"CREATE TABLE IF NOT EXISTS {s}.queue_clocks (queue text PRIMARY KEY, "
        "clock double precision NOT NULL)",
    ]


def _portals(s: str) -> list[str]:
    """From schema 2: each row's portal from its headers (what the ingress put there)."""
    return [
        f"ALTER TABLE {s}.messages ADD COLUMN IF NOT EXISTS portal text NOT NULL DEFAULT ''",
        # Read from the headers' text, never cast to jsonb: one row whose headers jsonb refuses
        # (a "\u0000" a handler's error put in a dead letter's) would fail the upgrade at every
        # start. The ingress passes a member_id only of these characters.
        f"UPDATE {s}.messages SET portal = coalesce(substring(headers from "
        f"'\"{c.H_MEMBER_ID}\": *\"([A-Za-z0-9_]{{1,{MAX_PORTAL_CHARS}}})\"'), '') "
        f"WHERE headers LIKE '%{c.H_MEMBER_ID}%'",
        *_turns(s),
    ]


def _order(s: str) -> list[str]:
    # order_key: the row's group under its consumer's order (b24queue.ordering), NULL until the
    # first ordered claim keys it. Ordered claims read a group's rows in the order accepted, and
    # the rows not keyed yet in that order, by this index.
    return [
        f"ALTER TABLE {s}.messages ADD COLUMN IF NOT EXISTS order_key text",
        f"CREATE INDEX IF NOT EXISTS messages_order ON {s}.messages (queue, order_key, id)",
    ]


UPGRADE_TIMEOUT_S = 3600.0


def notify_channel(schema: str) -> str:
    """Where publishes notify (payload: the queue's name) and idle workers listen."""
    return f"b24queue.{schema}"


def statement_timeout_s(settings: Settings) -> float:
    """No statement of ours waits longer: a connection stalled without being closed (a half-open
    TCP connection) fails it, and `broken` then drops the connection for a new one."""
    return max(settings.connect_timeout_s, settings.publish_timeout_s)


async def _no_reset(connection: asyncpg.Connection) -> None:
    """Pool connections keep no session state of ours: skip asyncpg's reset round trip."""


def server_settings(name: str) -> dict[str, str]:
    # application_name: at most 63 bytes are kept by PostgreSQL.
    return {
        "application_name": name.encode()[:63].decode(errors="ignore"),
        "synchronous_commit": "on",
    }


async def connect(settings: Settings, name: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(
            settings.broker_url,
            timeout=settings.connect_timeout_s,
            command_timeout=statement_timeout_s(settings),
            server_settings=server_settings(name),
        )
    except Exception as exc:
        raise translate(exc, settings) from None


async def opened(settings: Settings, name: str) -> asyncpg.Connection:
    """A connection, with the schema created or checked (the CLI's and the publisher's start)."""
    connection = await connect(settings, name)
    try:
        await ensure_schema(connection, settings.postgres_schema)
    except BaseException as exc:
        await asyncio.gather(connection.close(), return_exceptions=True)
        if isinstance(exc, Exception):
            raise translate(exc, settings) from None
        raise
    return connection


async def create_pool(settings: Settings, name: str, size: int) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            settings.broker_url,
            min_size=1,
            max_size=size,
            timeout=settings.connect_timeout_s,
            command_timeout=statement_timeout_s(settings),
            server_settings=server_settings(name),
            reset=_no_reset,
        )
    except Exception as exc:
        raise translate(exc, settings) from None
    assert pool is not None
    return pool


def broken(exc: BaseException) -> bool:
    """After this, is the connection unusable? A statement the server refused leaves it fine;
    anything on the client's side (a lost socket, a cancel mid-statement, asyncpg's protocol
    left mid-operation) does not, and it must not be used again."""
    return not isinstance(exc, asyncpg.PostgresError) or isinstance(exc, CONNECTION_ERRORS)


@contextlib.asynccontextmanager
async def lent(pool: asyncpg.Pool, timeout_s: float) -> AsyncIterator[Db]:
    """A pool connection; one that `broken` says is unusable is closed, not given back."""
    async with pool.acquire(timeout=timeout_s) as db:
        try:
            yield db
        except BaseException as exc:
            if broken(exc):
                db.terminate()
            raise


async def _version(connection: Db, schema: str) -> int | None:
    """The queue schema's version, or None where there is none yet."""
    if await connection.fetchval("SELECT to_regclass($1)", f'"{schema}".meta') is None:
        return None
    version = await connection.fetchval(
        f'SELECT value FROM "{schema}".meta WHERE key = $1',
        "schema",
    )
    if version is not None and int(version) > SCHEMA_VERSION:
        raise ConfigError(
            f"PostgreSQL schema {schema!r} has queue schema {version}, newer than this "
            f"b24queue knows ({SCHEMA_VERSION}): upgrade b24queue"
        )
    return None if version is None else int(version)


async def ensure_schema(connection: Db, schema: str) -> None:
    """Create or check the schema, under an advisory lock (several processes may start at once).
    A schema newer than this code is a clear error, not a guess. A current one is only read: a
    role with no CREATE privilege can run on a schema made once by its owner."""
    if await _version(connection, schema) != SCHEMA_VERSION:
        async with connection.transaction():
            await connection.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"b24queue:{schema}"
            )
            version = await _version(connection, schema)
            if version is None:
                for statement in schema_statements(schema):
                    await connection.execute(statement)
                await connection.execute(
                    f'INSERT INTO "{schema}".meta VALUES ($1, $2) ON CONFLICT DO NOTHING',
                    "schema",
                    str(SCHEMA_VERSION),
                )
            elif version < SCHEMA_VERSION:
                await _upgrade(connection, schema, version)
    if await connection.fetchval("SHOW fsync") == "off":
        log.error("PostgreSQL runs with fsync=off: a crash of its host can lose accepted events")


async def _upgrade(connection: Db, schema: str, version: int) -> None:
    """In place, in the caller's transaction, by a role that may alter the schema: from 1
    (before `queue_sizes`) its table; from 2 (before fair claims) each row's portal, its index
    and the turns' tables; from 3 (before ordered claims) the order key's column (NULL: keyed by
    the first ordered claim that meets the row; adding it rewrites no row) and its index (built
    by reading every row, writes to the table blocked meanwhile: docs/ordering.md#upgrading).
    The rows waiting stay."""
    s = f'"{schema}"'
    statements = (
        (_sizes(s) if version < 2 else []) + (_portals(s) if version < 3 else []) + _order(s)
    )
    try:
        for statement in statements:
            # A backlog of millions is read once here: the statements' usual bound (seconds)
            # would fail the upgrade at every start.
            await connection.execute(statement, timeout=UPGRADE_TIMEOUT_S)
    except asyncpg.exceptions.InsufficientPrivilegeError:
        raise ConfigError(
            f"PostgreSQL schema {schema!r} has queue schema {version}; this b24queue needs "
            f"{SCHEMA_VERSION} (new tables {schema}.queue_sizes, {schema}.portal_turns, "
            f"{schema}.queue_clocks and columns of {schema}.messages): start it once as the "
            "role that owns the schema (`b24queue topology` does), then grant the app's role "
            "SELECT, INSERT, UPDATE, DELETE on the new tables"
        ) from None
    await connection.execute(
        f'UPDATE "{schema}".meta SET value = $1 WHERE key = $2', str(SCHEMA_VERSION), "schema"
    )


def translate(exc: Exception, settings: Settings) -> Exception:
    """A driver error as ours (`b24queue.errors`), for the CLI's one-line messages (the URL in
    them without its password)."""
    where = settings.redacted_broker_url()
    refused = (
        asyncpg.exceptions.InvalidAuthorizationSpecificationError,
        asyncpg.exceptions.InvalidPasswordError,
        asyncpg.exceptions.InvalidCatalogNameError,
        asyncpg.exceptions.InsufficientPrivilegeError,
        asyncpg.exceptions.ClientConfigurationError,
    )
    if isinstance(exc, refused):
        return ConfigError(f"PostgreSQL at {where} refused: {exc}")
    if isinstance(exc, CONNECTION_ERRORS):
        return BrokerUnavailableError(f"cannot reach PostgreSQL at {where}: {exc!r}")
    return exc


class Listener:
    """One connection that LISTENs on the schema's channel and sets the wake-up of the queue a
    notification names. Reconnects by itself; after a reconnect it wakes every queue (what was
    notified meanwhile is lost), and until then the runners poll."""

    def __init__(self, settings: Settings, name: str) -> None:
        self._settings = settings
        self._name = name
        self.channel = notify_channel(settings.postgres_schema)
        self._events: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()

    def event(self, queue: str) -> asyncio.Event:
        return self._events.setdefault(queue, asyncio.Event())

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep(), name="b24queue-postgres-listen")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _notified(self, connection: Any, pid: int, channel: str, payload: object) -> None:
        event = self._events.get(str(payload))
        if event is not None:
            event.set()

    async def _keep(self) -> None:
        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection = await connect(self._settings, self._name)
                self._lost.clear()
                connection.add_termination_listener(lambda _: self._lost.set())
                await connection.add_listener(self.channel, self._notified)
                for event in self._events.values():
                    event.set()
                await self._lost.wait()
                log.warning("the LISTEN connection to PostgreSQL was lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot LISTEN on PostgreSQL (%r); polling meanwhile", exc)
            finally:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(connection.close(), 2)
            await asyncio.sleep(self._settings.reconnect_interval_s)
