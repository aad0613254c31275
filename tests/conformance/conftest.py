"""The conformance suite: the same scenarios, the same test code, on every transport present
(RabbitMQ on the machine's broker, SQLite in a temporary file). A transport passes when each
guarantee of docs/transports/index.md holds through the real ingress app and the real worker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from b24queue.settings import load_settings
from tests.support.bench import Bench
from tests.support.kafka_server import KafkaServer, kafka_server, kafka_settings
from tests.support.postgres import postgres_schema
from tests.support.rabbitmq import AMQP_URL, broker_slice
from tests.support.redis_server import RedisServer, redis_server
from tests.support.samples import SAMPLE_TOKEN


@pytest.fixture(scope="session")
def redis_aof() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def tansu() -> Iterator[KafkaServer]:
    with kafka_server() as server:
        yield server


@pytest.fixture(params=["amqp", "sqlite", "postgres", "redis", "kafka"])
async def bench(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Bench]:
    if request.param == "amqp":
        async with broker_slice() as broker:
            yield Bench(broker.make_settings(broker_url=AMQP_URL), broker.prefix)
        return
    prefix = f"t{uuid.uuid4().hex[:10]}"
    if request.param == "postgres":
        async with postgres_schema(prefix) as settings:
            yield Bench(settings, prefix)
        return
    if request.param == "kafka":
        yield Bench(kafka_settings(request.getfixturevalue("tansu"), prefix), prefix)
        return
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_aof")
        yield Bench(
            load_settings(
                broker_url=server.url,
                redis_prefix=prefix,
                redis_poll_s=0.2,
                app_tokens=SAMPLE_TOKEN,
                exchange=f"{prefix}.events",
                unrouted=f"{prefix}.unrouted",
                publish_timeout_s=3.0,
                shutdown_timeout_s=10.0,
            ),
            prefix,
        )
        return
    settings = load_settings(
        broker_url=f"sqlite:{tmp_path / 'queue.sqlite3'}",
        app_tokens=SAMPLE_TOKEN,
        exchange=f"{prefix}.events",
        unrouted=f"{prefix}.unrouted",
        publish_timeout_s=3.0,
        shutdown_timeout_s=10.0,
        sqlite_poll_s=0.02,
    )
    yield Bench(settings, prefix)
