"""The conformance suite: the same scenarios, the same test code, on every transport present
(RabbitMQ on the machine's broker, SQLite in a temporary file). A transport passes when each
guarantee of docs/transports/index.md holds through the real ingress app and the real worker."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from b24queue.auth.tokens import StaticTokens
from b24queue.ingress.app import create_app
from b24queue.settings import Settings, load_settings
from b24queue.transports import Transport, connection_name, transport_for
from tests.conftest import SAMPLE_TOKEN, sample_form
from tests.integration.conftest import AMQP_URL, broker_slice, wait_until
from tests.kafka_server import KafkaServer, kafka_server
from tests.postgres import postgres_schema
from tests.redis_server import RedisServer, redis_server

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class Bench:
    """One test's queue, on one transport."""

    def __init__(self, settings: Settings, prefix: str) -> None:
        self.settings = settings
        self.prefix = prefix
        self.transport: Transport = transport_for(settings)

    def name(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    def with_settings(self, **overrides: Any) -> Settings:
        return self.settings.model_copy(update=overrides)

    @contextlib.asynccontextmanager
    async def ingress(self) -> AsyncIterator[TestClient[Any, Any]]:
        async with self.transport.publisher(connection_name("ingress", self.prefix)) as sink:
            await wait_until(sink.is_ready, 15, "the publisher ready")
            app = create_app(self.settings, sink, StaticTokens(self.settings.app_tokens))
            async with TestClient(TestServer(app)) as client:
                yield client

    async def post(self, *names: str) -> list[str]:
        """Post samples through the real ingress; their message ids, in order."""
        ids = []
        async with self.ingress() as client:
            for name in names:
                resp = await client.post("/b24/events", data=sample_form(name), headers=FORM)
                assert resp.status == 200, await resp.text()
                ids.append((await resp.json())["message_id"])
        return ids


@pytest.fixture(scope="session")
def redis_aof() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def tansu() -> Iterator[KafkaServer]:
    with kafka_server() as server:
        yield server


def kafka_settings(server: KafkaServer, prefix: str, **overrides: Any) -> Settings:
    """A test's own namespace on the tests' Tansu: its events topic, unrouted topic, queues."""
    values: dict[str, Any] = {
        "broker_url": server.url,
        "app_tokens": SAMPLE_TOKEN,
        "exchange": f"{prefix}.events",
        "unrouted": f"{prefix}.unrouted",
        "kafka_partitions": 3,
        "kafka_session_timeout_s": 6.0,
        "publish_timeout_s": 3.0,
        "shutdown_timeout_s": 10.0,
    }
    return load_settings(**(values | overrides))


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
