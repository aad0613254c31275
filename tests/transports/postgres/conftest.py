"""The PostgreSQL transport's tests: the machine's PostgreSQL, a schema per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tests.support.bench import Bench
from tests.support.postgres import postgres_schema


@pytest.fixture
async def bench() -> AsyncIterator[Bench]:
    """A test's queue in a schema of its own (dropped afterwards)."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    async with postgres_schema(prefix) as settings:
        yield Bench(settings, prefix)
