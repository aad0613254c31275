"""The Redis transport's tests: a Redis the session starts (persistent, as b24queue needs it), a
key prefix per test; tests that need a Redis configured otherwise start their own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from b24queue.settings import load_settings
from tests.support.bench import Bench
from tests.support.redis_server import RedisServer, redis_server
from tests.support.samples import SAMPLE_TOKEN


@pytest.fixture(scope="session")
def redis_aof() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
def bench(redis_aof: RedisServer) -> Bench:
    """A test's queue under a key prefix of its own."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        broker_url=redis_aof.url,
        redis_prefix=prefix,
        redis_poll_s=0.2,
        app_tokens=SAMPLE_TOKEN,
        exchange=f"{prefix}.events",
        unrouted=f"{prefix}.unrouted",
        publish_timeout_s=3.0,
        shutdown_timeout_s=10.0,
    )
    return Bench(settings, prefix)
