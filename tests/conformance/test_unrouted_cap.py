"""The unrouted queue's cap (`B24QUEUE_UNROUTED_MAX_EVENTS`, `_MAX_BYTES`): past it the oldest
events go, on every transport, and what went is counted (our metric; RabbitMQ's own on RabbitMQ).
On the database and Redis transports the cap is kept by a ledger of the unrouted queue: it must
follow replays and purges, and be counted once on a queue that had none (an upgrade)."""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from b24queue import Event, EventConsumer
from b24queue.auth.tokens import StaticTokens
from b24queue.envelope import envelope_for
from b24queue.events import parse_event
from b24queue.http.ingress import create_app
from b24queue.metrics import IngressMetrics
from b24queue.settings import Settings
from b24queue.transports import connection_name, transport_for
from tests.support.bench import Bench
from tests.support.consumers import consumer
from tests.support.kafka_server import KafkaServer, kafka_settings
from tests.support.postgres import POSTGRES_URL
from tests.support.processes import env_for, ingress_with, post, stop
from tests.support.proxy import free_port
from tests.support.samples import sample_form
from tests.support.wait import wait_until

pytestmark = pytest.mark.broker

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
UNBOUND = "task-add"  # nobody binds ONTASKADD in these tests
RABBIT_DROPS = re.compile(
    r'^rabbitmq_global_messages_dead_lettered_maxlen_total\{queue_type="rabbit_quorum_queue",'
    r'dead_letter_strategy="disabled"\} (\S+)$',
    re.M,
)


def body_size(sample: str) -> int:
    """The body the ingress stores for a sample, in bytes (what the cap in bytes counts)."""
    return len(envelope_for(parse_event(FORM["Content-Type"], sample_form(sample))).body)


@contextlib.asynccontextmanager
async def ingress(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """The real ingress app on a publisher of the settings' transport, its metrics hooked to
    what the publisher drops as the ingress process does (`runtime.serve_ingress`)."""
    async with transport_for(settings).publisher(connection_name("ingress", "cap")) as sink:
        await wait_until(sink.is_ready, 15, "the publisher ready")
        metrics = IngressMetrics()
        metrics.watch_unrouted(sink.unrouted)
        app = create_app(settings, sink, StaticTokens(settings.app_tokens), metrics)
        async with TestClient(TestServer(app)) as client:
            yield client


async def post_unbound(
    client: TestClient[Any, Any], count: int, sample: str = UNBOUND
) -> list[str]:
    ids = []
    for _ in range(count):
        resp = await client.post("/b24/events", data=sample_form(sample), headers=FORM)
        assert resp.status == 200, await resp.text()
        ids.append((await resp.json())["message_id"])
    return ids


async def dropped_metric(client: TestClient[Any, Any]) -> float:
    text = await (await client.get("/metrics")).text()
    [value] = re.findall(r"^b24queue_unrouted_dropped_total (\S+)$", text, re.M)
    return float(value)


async def rabbit_drops() -> float:
    """RabbitMQ's own count of messages dropped by a quorum queue's length limit (its
    Prometheus plugin; global: other queues' drops count too, so only ever compared upwards)."""
    async with aiohttp.ClientSession() as s, s.get("http://127.0.0.1:15692/metrics") as r:
        return float(RABBIT_DROPS.findall(await r.text())[0])


async def unrouted_ids(settings: Settings) -> list[str]:
    async with transport_for(settings).dead_letters(settings.unrouted) as unrouted:
        total, letters = await unrouted.list(100)
    assert total == len(letters)
    return [x.message_id or "" for x in letters]


CAPPED = pytest.mark.parametrize(
    "bench", ["amqp", "sqlite", "postgres", "redis"], indirect=True
)  # Kafka: test_kafka_* below (Tansu enforces neither of Kafka's means)


@CAPPED
@pytest.mark.parametrize("cap", ["events", "bytes"])
async def test_the_unrouted_queue_keeps_its_newest_within_the_cap(bench: Bench, cap: str) -> None:
    size = body_size(UNBOUND)
    limits = {"unrouted_max_events": 3} if cap == "events" else {"unrouted_max_bytes": 3 * size}
    settings = bench.with_settings(**limits)
    await transport_for(settings).declare([])  # on RabbitMQ: the cap's policy, then the queue
    rabbit = await rabbit_drops() if settings.transport == "amqp" else 0.0
    async with ingress(settings) as client:
        ids = await post_unbound(client, 5)
        if settings.transport != "amqp":
            assert await dropped_metric(client) == 2
    assert await unrouted_ids(settings) == ids[2:]
    if settings.transport != "amqp":  # RabbitMQ's figures reach its API some seconds later
        problems = (await transport_for(settings).status()).problems
        assert any(p.startswith(f"{settings.unrouted} holds 3") for p in problems), problems
        assert any("its cap" in p for p in problems) == (cap == "events"), problems
    if settings.transport == "amqp":  # dropped by RabbitMQ, counted by RabbitMQ

        async def counted() -> bool:
            return await rabbit_drops() >= rabbit + 2

        await wait_until(counted, 10, "RabbitMQ counting the 2 dropped")


LEDGERED = pytest.mark.parametrize("bench", ["sqlite", "postgres", "redis"], indirect=True)


@LEDGERED
@pytest.mark.parametrize("cap", ["events", "bytes"])
async def test_the_cap_follows_purges_and_replays(bench: Bench, cap: str) -> None:
    """What an operator takes out of the unrouted queue makes room: the ledger follows."""
    size = body_size(UNBOUND)
    assert body_size("crm-deal-add") <= size  # the last three fit in either cap
    limits = {"unrouted_max_events": 3} if cap == "events" else {"unrouted_max_bytes": 3 * size}
    settings = bench.with_settings(**limits)
    async with ingress(settings) as client:
        await post_unbound(client, 3)
        async with transport_for(settings).dead_letters(settings.unrouted) as unrouted:
            assert await unrouted.purge(2) == 2
        kept = await post_unbound(client, 2)
        assert await dropped_metric(client) == 0
        assert (await unrouted_ids(settings))[-2:] == kept and len(kept) == 2

        # A consumer binds ONTASKADD: replayed, the three leave the unrouted queue.
        async def handle(self: EventConsumer, event: Event) -> None:
            return None

        bound = consumer(bench.name("tasks"), ("ONTASKADD",), handle)
        await transport_for(settings).declare([bound])
        async with transport_for(settings).dead_letters(settings.unrouted) as unrouted:
            assert await unrouted.replay() == (3, 3)
        # Another event nobody binds: three fit without a drop.
        more = await post_unbound(client, 3, "crm-deal-add")
        assert await dropped_metric(client) == 0
    assert await unrouted_ids(settings) == more


async def forget_ledger(settings: Settings) -> None:
    """As a queue made by a b24queue before the cap: no ledger (PostgreSQL: schema 1)."""
    if settings.transport == "sqlite":
        import sqlite3

        file = sqlite3.connect(settings.sqlite_path)
        with file:
            file.execute("DROP TABLE queue_sizes")
        file.close()
    elif settings.transport == "postgres":
        db = await asyncpg.connect(POSTGRES_URL)
        try:
            s = settings.postgres_schema
            await db.execute(f'DROP TABLE "{s}".queue_sizes')
            await db.execute(f"UPDATE \"{s}\".meta SET value = '1' WHERE key = 'schema'")
        finally:
            await db.close()
    else:
        client = aioredis.Redis.from_url(settings.broker_url)
        try:
            await client.delete(f"{settings.redis_prefix}:q:{settings.unrouted}:bytes")
        finally:
            await client.aclose()


@LEDGERED
async def test_a_queue_from_before_the_cap_is_counted_once(bench: Bench) -> None:
    size = body_size(UNBOUND)
    async with ingress(bench.settings) as client:  # the default cap: nothing dropped
        await post_unbound(client, 4)
    await forget_ledger(bench.settings)
    # The cap in bytes catches it only if the four already there were counted.
    settings = bench.with_settings(unrouted_max_bytes=3 * size)
    async with ingress(settings) as client:
        [last] = await post_unbound(client, 1)
        assert await dropped_metric(client) == 2
    assert (await unrouted_ids(settings))[-1] == last
    assert len(await unrouted_ids(settings)) == 3


async def test_the_ingress_process_counts_and_logs_what_it_drops(tmp_path: Path) -> None:
    """`b24queue ingress` itself: its /metrics and its log (SQLite: no server to start)."""
    from b24queue.settings import load_settings
    from tests.support.samples import SAMPLE_TOKEN

    settings = load_settings(
        broker_url=f"sqlite:{tmp_path / 'queue.sqlite3'}", app_tokens=SAMPLE_TOKEN
    )
    env = env_for(settings, tmp_path / "ingress.record", B24QUEUE_UNROUTED_MAX_EVENTS="2")
    port = free_port()
    proc = await ingress_with(env, tmp_path, port)
    try:
        await post(f"http://127.0.0.1:{port}/b24/events", 5, UNBOUND)
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{port}/metrics") as r,
        ):
            text = await r.text()
    finally:
        assert await stop(proc, tmp_path / "ingress.log") == 0
    assert "b24queue_unrouted_dropped_total 3.0" in text, text
    said = (tmp_path / "ingress.log").read_text()
    # One line for the first drop; the next two within LOG_EVERY_S are only counted.
    assert said.count("oldest event(s)") == 1, said
    assert "dropped the 1 oldest event(s)" in said and "B24QUEUE_UNROUTED_MAX_EVENTS" in said


async def test_kafka_creates_the_unrouted_topic_capped_in_bytes(tansu: KafkaServer) -> None:
    from tests.support.kafka_server import topic_configs

    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = kafka_settings(tansu, prefix, unrouted_max_bytes=64 * 1024 * 1024)
    await transport_for(settings).declare([])
    configs = await topic_configs(tansu.bootstrap, settings.unrouted)
    assert configs["retention.ms"] == "-1"  # never by age
    assert configs["retention.bytes"] == str(64 * 1024 * 1024)
    assert configs["segment.bytes"] == str(8 * 1024 * 1024)  # an eighth: the cap bites


async def test_kafka_says_how_to_cap_an_unrouted_topic_made_before(
    tansu: KafkaServer, caplog: pytest.LogCaptureFixture
) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = kafka_settings(tansu, prefix)
    client = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
    await client.start()
    try:  # as an older b24queue made it: kept for ever, no cap
        await client.create_topics(
            [NewTopic(settings.unrouted, 1, 1, topic_configs={"retention.ms": "-1"})]
        )
    finally:
        await client.close()
    with caplog.at_level(logging.WARNING):
        await transport_for(settings).declare([])  # not a mismatch: it runs
    [line] = [r.getMessage() for r in caplog.records if "has no cap" in r.getMessage()]
    assert f"--entity-name {settings.unrouted} --add-config retention.bytes=" in line


async def test_kafka_without_delete_records_says_so_and_publishes_on(
    tansu: KafkaServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Tansu 0.6 has no DeleteRecords, by which a publisher keeps the count: said once, and
    the events still go in (its bytes cap would be retention.bytes, which Tansu ignores too)."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = kafka_settings(tansu, prefix, unrouted_max_events=2)
    caplog.set_level(logging.DEBUG, logger="b24queue.transports.kafka.unrouted")
    bench = Bench(settings, prefix)
    async with ingress(settings) as client:
        ids = await post_unbound(client, 5)

        def said() -> bool:
            return any("did not delete" in r.getMessage() for r in caplog.records)

        await wait_until(said, 15, "the refusal said")
        assert await dropped_metric(client) == 0
    warned = [r for r in caplog.records if "did not delete" in r.getMessage()]
    first, *later = [r.levelno for r in warned]
    assert first == logging.WARNING and set(later) <= {logging.DEBUG}
    assert await unrouted_ids(bench.settings) == ids


async def test_postgres_schema_1_takes_its_ledger_from_a_role_that_may_create_it() -> None:
    """The app's role (no CREATE) on a schema made before the cap: a clear error naming what to
    do, not a half-upgraded schema; once the owner started, the app's role runs."""
    from b24queue.errors import ConfigError
    from tests.support.postgres import postgres_schema

    prefix, role = f"t{uuid.uuid4().hex[:10]}", f"r{uuid.uuid4().hex[:10]}"
    async with postgres_schema(prefix) as owner:
        await transport_for(owner).declare([])
        await forget_ledger(owner)
        admin = await asyncpg.connect(POSTGRES_URL)
        try:
            await admin.execute(f"CREATE ROLE {role} LOGIN")
            await admin.execute(f'GRANT USAGE ON SCHEMA "{prefix}" TO {role}')
            grant = f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{prefix}"'
            await admin.execute(f"{grant} TO {role}")
            await admin.execute(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA "{prefix}" TO {role}')
            app = owner.model_copy(
                update={"broker_url": f"postgresql://{role}@127.0.0.1:5432/test"}
            )
            async with transport_for(app).publisher("schema-1") as sink:
                failed = await sink.failed()
            assert isinstance(failed, ConfigError), failed
            assert "queue_sizes" in str(failed) and "b24queue topology" in str(failed)

            await transport_for(owner).declare([])  # the owner's start upgrades it
            await admin.execute(f"{grant} TO {role}")
            async with ingress(app) as client:
                await post_unbound(client, 1)
        finally:
            await admin.execute(f'REVOKE ALL ON ALL TABLES IN SCHEMA "{prefix}" FROM {role}')
            await admin.execute(f'REVOKE ALL ON ALL SEQUENCES IN SCHEMA "{prefix}" FROM {role}')
            await admin.execute(f'REVOKE ALL ON SCHEMA "{prefix}" FROM {role}')
            await admin.execute(f"DROP ROLE {role}")
            await admin.close()
