"""Finding 1 against the real RabbitMQ: a header that once closed the connection (FRAME_ERROR) on
every forward, jamming the spool for everyone, is refused at the edge; and a spooled event that
still breaks the connection, or that the broker refuses, is moved aside while the rest flows."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from b24queue.auth.tokens import StaticTokens
from b24queue.events.envelope import Envelope, envelope_for
from b24queue.ingress.app import create_app
from b24queue.ingress.fallback import SpoolingSink
from b24queue.ingress.spool import Spool
from b24queue.testing import make_event
from b24queue.transports.amqp import publisher as publisher_module
from b24queue.transports.amqp.publisher import AmqpPublisher
from tests.support.rabbitmq import Broker
from tests.support.samples import FORM, sample_form
from tests.support.wait import wait_until

pytestmark = pytest.mark.broker


@contextlib.asynccontextmanager
async def spooling_ingress(
    broker: Broker, spool_path: Path
) -> AsyncIterator[tuple[TestClient[Any, Any], SpoolingSink]]:
    settings = broker.make_settings(publish_timeout_s=1.0)
    async with (
        AmqpPublisher(settings, f"b24queue security {broker.prefix}") as publisher,
        Spool(spool_path, 1000) as spool,
        SpoolingSink(publisher, spool, bypass_s=1, retry_interval_s=0.2) as sink,
    ):
        app = create_app(settings, sink, StaticTokens(settings.app_tokens))
        async with TestClient(TestServer(app)) as client:
            await wait_until(publisher.is_ready, 15, "publisher ready")
            yield client, sink


async def test_a_200k_domain_is_refused_and_events_keep_flowing(
    broker: Broker, tmp_path: Path
) -> None:
    queue = await broker.bind_queue("all", "#")
    async with spooling_ingress(broker, tmp_path / "spool.sqlite3") as (client, sink):
        huge = sample_form("crm-deal-add").replace(
            b"auth%5Bdomain%5D=acme.bitrix24.com", b"auth%5Bdomain%5D=" + b"a" * 200_000
        )
        resp = await client.post("/b24/events", data=huge, headers=FORM)
        assert resp.status == 400 and (await resp.json())["field"] == "auth[domain]"
        for _ in range(3):
            resp = await client.post("/b24/events", data=sample_form("crm-deal-add"), headers=FORM)
            assert resp.status == 200, await resp.text()
        assert (sink.depth, sink.spooled_total) == (0, 0)
    assert len(await broker.take(queue, 3)) == 3


def poison(i: int) -> Envelope:
    """What an older version spooled: a header far over the broker's frame_max."""
    good = envelope_for(make_event("ONCRMDEALADD", {"FIELDS": {"ID": str(i)}}))
    return replace(good, headers={**good.headers, "x-b24-domain": "a" * 200_000})


def good(i: int) -> Envelope:
    return envelope_for(make_event("ONCRMDEALADD", {"FIELDS": {"ID": str(i)}}))


async def spool_rows(path: Path, envelopes: list[Envelope]) -> None:
    async with Spool(path, 1000) as spool:
        for e in envelopes:
            await spool.put(e)


async def test_a_spooled_event_that_breaks_the_connection_is_moved_aside(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if spooled by a version without the size check, and sent without it: each attempt to
    # publish it closes the connection. It is at the head of the line.
    monkeypatch.setattr(publisher_module, "check_size", lambda envelope: None)
    queue = await broker.bind_queue("all", "#")
    path = tmp_path / "spool.sqlite3"
    rows = [poison(0), good(1), good(2), good(3)]
    await spool_rows(path, rows)
    async with spooling_ingress(broker, path) as (client, sink):
        await wait_until(lambda: sink.spool.count == 0, 60, "the spool to drain")
        assert (sink.spool.quarantined, sink.forwarded_total) == (1, 3)
        # And the ingress takes events again, straight to RabbitMQ.
        resp = await client.post("/b24/events", data=sample_form("crm-deal-add"), headers=FORM)
        assert resp.status == 200
    # Every good one arrives (a publish repeated across a reconnect may arrive twice: at least
    # once, never lost).
    seen: set[str | None] = set()

    async def all_arrived() -> bool:
        depth = await broker.depth(queue)
        if depth:
            seen.update(m.message_id for m in await broker.take(queue, depth))
        return {e.message_id for e in rows[1:]} <= seen

    await wait_until(all_arrived, 15, "the three good events")
    assert rows[0].message_id not in seen
    async with Spool(path, 1000) as spool:  # kept, not lost
        assert spool.quarantined == 1


async def test_a_spooled_event_the_broker_cannot_take_goes_aside_at_once(
    broker: Broker, tmp_path: Path
) -> None:
    queue = await broker.bind_queue("all", "#")
    path = tmp_path / "spool.sqlite3"
    await spool_rows(path, [poison(0), good(1)])
    async with spooling_ingress(broker, path) as (_, sink):
        await wait_until(lambda: sink.spool.count == 0, 30, "the spool to drain")
        assert (sink.spool.quarantined, sink.forwarded_total) == (1, 1)
    assert len(await broker.take(queue, 1)) == 1
