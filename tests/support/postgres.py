"""The machine's PostgreSQL for tests: a schema of its own per test, dropped afterwards."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from b24queue.settings import Settings, load_settings
from tests.support.samples import SAMPLE_TOKEN

POSTGRES_URL = os.environ.get("B24QT_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.asynccontextmanager
async def postgres_schema(prefix: str, **overrides: Any) -> AsyncIterator[Settings]:
    """Settings of a queue in schema `prefix` of the machine's PostgreSQL (dropped at the end)."""
    values: dict[str, Any] = {
        "broker_url": POSTGRES_URL,
        "postgres_schema": prefix,
        "app_tokens": SAMPLE_TOKEN,
        "exchange": f"{prefix}.events",
        "unrouted": f"{prefix}.unrouted",
        "publish_timeout_s": 3.0,
        "shutdown_timeout_s": 10.0,
        "postgres_poll_s": 0.5,
    }
    settings = load_settings(**{**values, **overrides})
    try:
        yield settings
    finally:
        db = await asyncpg.connect(POSTGRES_URL)
        try:
            await db.execute(f'DROP SCHEMA IF EXISTS "{prefix}" CASCADE')
        finally:
            await db.close()


async def forget_ledger(settings: Settings) -> None:
    """As a queue made by a b24queue before the unrouted queue's cap: no ledger, schema 1."""
    db = await asyncpg.connect(POSTGRES_URL)
    try:
        s = settings.postgres_schema
        await db.execute(f'DROP TABLE "{s}".queue_sizes')
        await db.execute(f"UPDATE \"{s}\".meta SET value = '1' WHERE key = 'schema'")
    finally:
        await db.close()


async def to_schema_3(settings: Settings) -> None:
    """As a queue made by a b24queue before ordered claims: no order_key, schema 3."""
    db = await asyncpg.connect(POSTGRES_URL)
    try:
        s = f'"{settings.postgres_schema}"'
        await db.execute(f"DROP INDEX {s}.messages_order")
        await db.execute(f"ALTER TABLE {s}.messages DROP COLUMN order_key")
        await db.execute(f"UPDATE {s}.meta SET value = '3' WHERE key = 'schema'")
    finally:
        await db.close()


async def to_schema_2(settings: Settings) -> None:
    """As a queue made by a b24queue before fair claims: no portal column, no turns, schema 2."""
    db = await asyncpg.connect(POSTGRES_URL)
    try:
        s = f'"{settings.postgres_schema}"'
        await db.execute(f"DROP INDEX {s}.messages_order")
        await db.execute(f"ALTER TABLE {s}.messages DROP COLUMN order_key")
        await db.execute(f"DROP INDEX {s}.messages_portal")
        await db.execute(f"ALTER TABLE {s}.messages DROP COLUMN portal")
        await db.execute(f"DROP TABLE {s}.portal_turns, {s}.queue_clocks")
        await db.execute(f"UPDATE {s}.meta SET value = '2' WHERE key = 'schema'")
    finally:
        await db.close()
