"""Redis over its `maxmemory` (policy noeviction), on a Redis of this module's own: new events
are refused cleanly (503, or spooled and forwarded later), while workers start, claim, retry,
dead-letter and drain the backlog, which is what frees the memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from b24queue import EventConsumer, Reject, Retry
from b24queue.auth.tokens import StaticTokens
from b24queue.cli.status import render
from b24queue.errors import BrokerUnavailableError
from b24queue.events import Event
from b24queue.events.envelope import EventSink, envelope_for
from b24queue.ingress.app import create_app
from b24queue.ingress.fallback import SpoolingSink
from b24queue.ingress.spool import Spool
from b24queue.queues import spec_for
from b24queue.settings import Settings, load_settings
from b24queue.testing import make_event
from b24queue.transports.kit import leased
from b24queue.transports.redis_streams.connection import connect
from b24queue.transports.redis_streams.publisher import RedisPublisher
from b24queue.transports.redis_streams.store import Store
from b24queue.transports.redis_streams.transport import Redis
from b24queue.worker import Worker
from tests.support.redis_server import RedisServer, redis_server
from tests.support.samples import SAMPLE_TOKEN, sample_form
from tests.support.wait import wait_until

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
BODY = "x" * 2000  # an event of about 2 KiB


@pytest.fixture(scope="module")
def full_server() -> Iterator[RedisServer]:
    with redis_server(extra=("--maxmemory-policy", "noeviction")) as server:
        yield server


@pytest.fixture
async def admin(full_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(full_server.url)
    await client.config_set("maxmemory", "0")
    yield client
    await client.config_set("maxmemory", "0")
    await client.config_set("maxmemory-policy", "noeviction")
    await client.flushall()
    await client.aclose()


@pytest.fixture
def settings(full_server: RedisServer) -> Settings:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    return load_settings(
        broker_url=full_server.url,
        redis_prefix=prefix,
        redis_poll_s=0.2,
        app_tokens=SAMPLE_TOKEN,
        unrouted=f"{prefix}.unrouted",
        publish_timeout_s=3.0,
        reconnect_interval_s=0.2,
        shutdown_timeout_s=5.0,
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    s = Store(connect(settings, "test-full"), settings)
    await s.declare_unrouted()  # as an ingress that ran before did
    yield s
    await s.client.aclose()


async def fill(store: Store, consumer: type[EventConsumer], count: int) -> list[str]:
    await store.declare(spec_for(consumer))
    events = [
        envelope_for(make_event("ONCRMDEALADD", {"B": BODY, "N": str(i)})) for i in range(count)
    ]
    for i in range(0, count, 100):
        await store.publish(events[i : i + 100])
    return [e.message_id for e in events]


async def used(admin: aioredis.Redis) -> int:
    return int((await admin.info("memory"))["used_memory"])


async def full(admin: aioredis.Redis) -> bool:
    """Over maxmemory as Redis counts it (what it refuses writes by)."""
    info = await admin.info("memory")
    counted = int(info["used_memory"]) - int(info["mem_not_counted_for_evict"])
    return 0 < int(info["maxmemory"]) < counted


class Backlog(EventConsumer):
    queue = "full.backlog"
    events = ("ONCRMDEALADD",)
    handled: ClassVar[set[str]] = set()

    async def handle(self, event: Event) -> None:
        Backlog.handled.add(event.message_id)


class Fresh(EventConsumer):
    """Never declared before the worker starts: its queue is made while Redis is full."""

    queue = "full.fresh"
    events = ("ONTASKADD",)

    async def handle(self, event: Event) -> None:
        return None


async def test_a_worker_starts_and_drains_a_backlog_over_maxmemory(
    settings: Settings, store: Store, admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    before = await used(admin)
    ids = await fill(store, Backlog, 800)
    filled = await used(admin)
    await admin.config_set("maxmemory", str((before + filled) // 2))  # half the backlog over
    assert await full(admin)
    Backlog.handled = set()
    with caplog.at_level(logging.WARNING):
        async with Worker(settings, [Backlog, Fresh]):
            await wait_until(lambda: Backlog.handled == set(ids), 30, "the backlog drained")
    assert "is over its maxmemory" in caplog.text  # said at start
    assert not await full(admin)  # drained below maxmemory: recovered, no operator needed
    assert await store.exists(Fresh.queue) and await store.count(Backlog.queue) == 0
    await store.publish([envelope_for(make_event("ONCRMDEALADD"))])  # and events go in again
    assert "FULL" not in render(await Redis(settings).status(), settings)


class Gated(EventConsumer):
    """Waits at the gate; then retries every event once, and rejects the one numbered 0."""

    queue = "full.gated"
    events = ("ONCRMDEALADD",)
    prefetch = 4
    retry_delays_s = (0.05,)
    gate = asyncio.Event()
    waiting = 0
    attempts: ClassVar[dict[str, int]] = {}

    async def handle(self, event: Event) -> None:
        Gated.waiting += 1
        await Gated.gate.wait()
        Gated.attempts[event.message_id] = event.attempt
        if event.data["N"] == "0":
            raise Reject("number 0")
        if event.attempt == 1:
            raise Retry("once")


async def test_a_running_worker_claims_retries_and_dead_letters_while_redis_is_full(
    settings: Settings, store: Store, admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leased, "HEARTBEAT_S", 0.2)  # heartbeats while full, not in 5 s
    Gated.gate, Gated.waiting, Gated.attempts = asyncio.Event(), 0, {}
    async with Worker(settings, [Gated]):
        ids = await fill(store, Gated, 40)
        await wait_until(lambda: Gated.waiting == Gated.prefetch, 10, "the worker at the gate")
        await admin.config_set("maxmemory", "1")  # full, whatever the worker frees
        assert await full(admin)
        await asyncio.sleep(0.5)  # a few heartbeats while full (nothing to wait for: no timing)
        Gated.gate.set()
        await wait_until(
            lambda: all(Gated.attempts.get(i, 0) == 2 for i in ids[1:]), 30, "all retried once"
        )
        assert Gated.attempts[ids[0]] == 1
        assert await full(admin)  # all of it while Redis was full
    assert await store.count(Gated.queue) == 0
    assert [r.message_id for r in await store.first(Gated.queue + ".dlq", 10, None)] == ids[:1]
    async with Redis(settings).dead_letters(Gated.queue) as dlq:  # the operator, still full
        with pytest.raises(BrokerUnavailableError, match="over its maxmemory"):
            await dlq.replay()
        assert await dlq.purge(1) == 1


@pytest.mark.parametrize("spooled", [False, True])
async def test_the_ingress_refuses_events_cleanly_while_redis_is_full(
    spooled: bool, settings: Settings, store: Store, admin: aioredis.Redis, tmp_path: Path
) -> None:
    """An ingress (re)started while Redis is full: ready, and each event is refused with the
    reason (503 and Retry-After), or spooled and forwarded once Redis has room; never a 500."""
    await fill(store, Backlog, 200)
    await admin.config_set("maxmemory", "1")
    async with contextlib.AsyncExitStack() as stack:
        publisher = await stack.enter_async_context(RedisPublisher(settings, "test-full"))
        await wait_until(publisher.is_ready, 10, "the publisher ready")
        spool = await stack.enter_async_context(Spool(tmp_path / "spool.sqlite3", 100))
        sink: EventSink = publisher
        if spooled:
            sink = await stack.enter_async_context(
                SpoolingSink(publisher, spool, bypass_s=0.0, retry_interval_s=0.2)
            )
        app = create_app(settings, sink, StaticTokens(settings.app_tokens))
        async with TestClient(TestServer(app)) as client:
            resp = await client.post("/b24/events", data=sample_form("crm-deal-add"), headers=FORM)
            answer: Any = await resp.json()
        shown = render(await Redis(settings).status(), settings)
        assert "maxmemory-policy noeviction" in shown and "FULL" in shown, shown
        if not spooled:
            assert resp.status == 503, answer
            assert resp.headers["Retry-After"] == str(settings.retry_after_s)
            assert "over its maxmemory" in answer["error"], answer
            assert await store.count(Backlog.queue) == 200
            return
        assert resp.status == 200, answer
        assert spool.count == 1
        await admin.config_set("maxmemory", "0")  # room again
        await wait_until(lambda: spool.count == 0, 10, "the spool forwarded")
        rows = await store.first(Backlog.queue, 300, None)
        assert len(rows) == 201 and rows[-1].message_id == answer["message_id"]


async def test_an_ingress_first_started_while_full_gets_ready_once_there_is_room(
    settings: Settings, admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Its unrouted queue cannot be declared while Redis is full: it retries, one connection at
    a time (each failed try closes its own), and is ready once Redis has room."""
    await admin.config_set("maxmemory", "1")
    async with RedisPublisher(settings, "test-first-start") as publisher:
        await wait_until(lambda: caplog.text.count("retrying") >= 5, 10, "five tries")
        assert not publisher.is_ready()
        names = [c.get("name") for c in await admin.client_list()]
        assert names.count("test-first-start") <= 1, names
        await admin.config_set("maxmemory", "0")
        await wait_until(publisher.is_ready, 10, "the publisher ready")
        await publisher.publish(envelope_for(make_event("ONCRMDEALADD")))


async def test_a_worker_says_when_the_policy_can_evict_events(
    settings: Settings, store: Store, admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await admin.config_set("maxmemory-policy", "allkeys-lru")
    with caplog.at_level(logging.ERROR):
        async with Worker(settings, [Fresh]):
            pass
    assert "maxmemory-policy allkeys-lru: when full it can evict queued events" in caplog.text
    shown = render(await Redis(settings).status(), settings)
    assert "can evict queued events: set maxmemory-policy noeviction" in shown, shown


async def test_the_unrouted_queue_purges_over_maxmemory_and_its_cap_follows(
    settings: Settings, store: Store, admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """What frees memory works while full: a purge of the unrouted stream, its ledger (the cap in
    bytes) following; and an ingress restarted meanwhile without a ledger gets ready (counted at
    a later start, the cap in events holding meanwhile)."""
    events = [envelope_for(make_event("ONTASKADD", {"B": BODY, "N": str(i)})) for i in range(50)]
    await store.publish(events)  # nobody binds ONTASKADD: all unrouted
    ledger = store.sizes(settings.unrouted)
    counted = int(await admin.get(ledger) or 0)
    assert counted == sum(len(e.body) for e in events)
    await admin.config_set("maxmemory", str(await used(admin) // 2))
    assert await full(admin)
    async with Redis(settings).dead_letters(settings.unrouted) as unrouted:
        assert await unrouted.purge(10) == 10
    assert int(await admin.get(ledger) or 0) == counted - sum(len(e.body) for e in events[:10])
    await admin.delete(ledger)  # as before the cap
    with caplog.at_level(logging.WARNING):
        async with RedisPublisher(settings, "test-full-restart") as publisher:
            await wait_until(publisher.is_ready, 10, "the publisher ready")
    assert "the unrouted stream's bytes are counted at the next start" in caplog.text
