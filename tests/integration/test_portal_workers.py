"""Handlers calling their portal from real workers on the real RabbitMQ, the fake portal
counting: two worker processes share one portal's bucket and make one token refresh between
them; a token that expired while its event waited in the retry queue is refreshed."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from b24queue import Event, EventConsumer, PortalError, Retry
from b24queue.auth.store import open_store
from b24queue.portal.clients import PortalClients
from b24queue.worker import Worker
from tests.support.fake_portal import CLIENT_ID, FakePortal, StaticResolver
from tests.support.fake_rest import CLIENT_SECRET
from tests.support.portal_setup import OAUTH_URL, deal_event, install, portal_env
from tests.support.processes import ROOT, STARTED, stop
from tests.support.rabbitmq import Broker, running_ingress
from tests.support.wait import wait_until

pytestmark = pytest.mark.broker


async def post(broker: Broker, events: list[Event], tokens: str) -> None:
    settings = broker.make_settings(app_tokens=tokens)
    async with running_ingress(settings) as (client, _):
        for event in events:
            resp = await client.post("/b24/events", json=event.payload)
            assert resp.status == 200, await resp.text()


async def start_portal_workers(env: dict[str, str], tmp_path: Path, count: int) -> list[Any]:
    logs = [tmp_path / f"worker{i}.log" for i in range(count)]
    procs = []
    for log in logs:
        with open(log, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.support.portal_worker", cwd=ROOT, env=env,
                stdout=out, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        STARTED.append(proc)
        procs.append(proc)
    await wait_until(
        lambda: all(p.exists() and "worker running" in p.read_text() for p in logs),
        60,
        "the portal workers consuming",
    )
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("store_kind", ["sqlite", "redis"])
async def test_two_worker_processes_share_the_bucket_and_one_refresh(
    store_kind: str,
    broker: Broker,
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    rest = fake_portal.rest
    rest.burst, rest.drain_per_s = 20, 20.0  # Bitrix24's shape, time scaled down
    member = f"m{uuid.uuid4().hex[:12]}"
    spec = f"sqlite:{tmp_path / 'p.db'}" if store_kind == "sqlite" else "redis://127.0.0.1:6379/0"
    store = open_store(spec)
    # Installed an hour ago: its stored token has expired, so both processes want a refresh.
    await install(store, rest, member, lifetime_s=-5)
    record = tmp_path / "deals.record"
    env = portal_env(
        broker, spec, portal_certificate[0], fake_portal.listen_port,
        B24QUEUE_PORTAL_BURST="20", B24QUEUE_PORTAL_DRAIN_PER_S="20",
        B24QUEUE_PORTAL_MAX_WAIT_S="60", B24QT_QUEUE=broker.name("deals"),
        B24QT_RECORD=str(record),
    )  # fmt: skip
    workers = await start_portal_workers(env, tmp_path, 2)
    try:
        events = [deal_event(member, i) for i in range(1, 101)]
        await post(broker, events, f"app-token-{member}")

        def done() -> bool:
            text = record.read_text() if record.exists() else ""
            return len({line.split()[0] for line in text.splitlines()}) >= 100

        await wait_until(done, 60, "100 deals read")
        lines = [line.split() for line in record.read_text().splitlines()]
        assert {deal for deal, _ in lines} == {str(i) for i in range(1, 101)}
        by_process = Counter(pid for _, pid in lines)
        assert len(by_process) == 2, by_process  # both processes called the portal
        host = f"{member}.portal.test"
        assert rest.over_limit == 0 and rest.max_level[host] <= 20
        served = [t for h, m, t in rest.served if h == host and m == "crm.deal.get"]
        span = served[-1] - served[0]
        rate = (len(served) - 10) / span  # after the first 10 (our capacity) went at once
        print(f"\n{len(served)} calls by 2 processes in {span:.2f}s: {rate:.1f}/s after the burst")
        print(f"(drain 20/s; the portal would have let {20 + 20 * span:.0f} through)")
        assert rate <= 20 * 1.1
        assert rest.refreshes == 1 and rest.refused_refreshes == 0
        stored = await store.get(member)
        assert stored is not None and rest.valid_refresh_tokens(member) == [stored.refresh_token]
    finally:
        for proc in workers:
            await stop(proc)
        await store.forget(member)
        await store.close()


async def test_a_token_expired_while_the_event_waited_for_its_retry_is_refreshed(
    broker: Broker, fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    rest = fake_portal.rest
    spec = f"sqlite:{tmp_path / 'p.db'}"
    store = open_store(spec)
    stored = await install(store, rest, "m1")
    own, _, expires = rest.issue("m1")  # the event's own token
    read: list[dict[str, Any]] = []

    async def handle(self: EventConsumer, event: Event) -> None:
        if event.attempt == 1:
            # Stands in for the hour the event spends in a retry queue (or the DLQ): every
            # token it could use has expired by its next attempt.
            rest.expire(own)
            rest.expire(stored.access_token)
            raise Retry("not yet", delay_s=0.5)
        read.append(await self.portal(event).call("crm.deal.get", {"id": 7}))

    cls = type(
        "RetriedDealReader",
        (EventConsumer,),
        {
            "queue": broker.name("deals"),
            "events": ("ONCRMDEALUPDATE",),
            "retry_delays_s": (0.5,),
            "handle": handle,
        },
    )
    settings = broker.make_settings(
        app_tokens="app-token-m1",
        portal_store=spec,
        app_client_id=CLIENT_ID,
        app_client_secret=CLIENT_SECRET,
        oauth_url=OAUTH_URL,
        portal_allow_private=True,
        portal_ca_file=str(portal_certificate[0]),
    )
    started = time.monotonic()
    async with (
        PortalClients(settings, resolver=StaticResolver()) as portals,
        Worker(settings, [cls], portals=portals),
    ):
        await post(broker, [deal_event("m1", 7, access=own, expires=expires)], "app-token-m1")
        await wait_until(lambda: bool(read), 20, "the deal read on the retry")
    assert read[0]["ID"] == "7" and time.monotonic() - started < 20
    fresh = await store.get("m1")
    assert fresh is not None and rest.refreshes == 1
    # The event's own token never reached the worker (the body leaves the OAuth pair out): the
    # stored one was tried, refused as expired, refreshed once.
    assert own not in rest.used_tokens
    assert rest.used_tokens == [stored.access_token, fresh.access_token]
    await store.close()


async def test_an_event_let_in_by_another_token_cannot_use_the_portals_credentials(
    broker: Broker, fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    spec = f"sqlite:{tmp_path / 'p.db'}"
    store = open_store(spec)
    await install(store, fake_portal.rest, "m1")
    outcomes: dict[str, str] = {}

    async def handle(self: EventConsumer, event: Event) -> None:
        deal = event.data["FIELDS"]["ID"]
        try:
            await self.portal(event).call("crm.deal.get", {"id": deal})
            outcomes[deal] = "read"
        except PortalError as exc:
            outcomes[deal] = exc.code

    cls = type(
        "Guarded",
        (EventConsumer,),
        {"queue": broker.name("deals"), "events": ("ONCRMDEALUPDATE",), "handle": handle},
    )
    tokens = "app-token-m1,another-portals-webhook-token"
    settings = broker.make_settings(
        app_tokens=tokens, portal_store=spec, portal_allow_private=True,
        portal_ca_file=str(portal_certificate[0]),
    )  # fmt: skip
    forged = deal_event("m1", 2).payload
    forged["auth"]["application_token"] = "another-portals-webhook-token"
    async with (
        PortalClients(settings, resolver=StaticResolver()) as portals,
        Worker(settings, [cls], portals=portals),
    ):
        # Both pass the ingress (each carries a configured token); the body keeps neither token,
        # the message keeps a digest of it, and only m1's own opens m1's credentials.
        await post(broker, [deal_event("m1", 1), Event.from_payload(forged)], tokens)
        await wait_until(lambda: len(outcomes) == 2, 20, "both events handled")
    assert outcomes == {"1": "read", "2": "WRONG_PORTAL"}
    assert fake_portal.rest.deal_gets == ["1"]
    await store.close()


async def test_a_token_quoted_by_the_portal_never_reaches_the_dead_letter_headers(
    broker: Broker, fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    from b24queue import _constants as c

    spec = f"sqlite:{tmp_path / 'p.db'}"
    store = open_store(spec)
    record = await install(store, fake_portal.rest, "m1")

    async def handle(self: EventConsumer, event: Event) -> None:
        await self.portal(event).call("crm.deal.echo", {"id": 1})  # its error quotes the token

    cls = type(
        "Echoed",
        (EventConsumer,),
        {
            "queue": broker.name("deals"),
            "events": ("ONCRMDEALUPDATE",),
            "max_attempts": 1,
            "handle": handle,
        },
    )
    settings = broker.make_settings(
        app_tokens="app-token-m1", portal_store=spec, portal_allow_private=True,
        portal_ca_file=str(portal_certificate[0]),
    )  # fmt: skip
    async with (
        PortalClients(settings, resolver=StaticResolver()) as portals,
        Worker(settings, [cls], portals=portals),
    ):
        await post(broker, [deal_event("m1", 1)], "app-token-m1")
        (dead,) = await broker.take(f"{cls.queue}.dlq", 1)
    message = str(dead.headers[c.H_ERROR_MESSAGE])
    assert fake_portal.rest.used_tokens == [record.access_token]  # the stored one was sent
    assert "INVALID_REQUEST" in message and "auth=***" in message
    assert record.access_token not in message and record.access_token not in str(dead.headers)
    await store.close()


async def test_a_webhook_is_used_only_by_events_with_its_paired_token(
    broker: Broker, fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    fake_portal.rest.webhooks["abcd1234"] = "w1"
    outcomes: dict[str, str] = {}

    async def handle(self: EventConsumer, event: Event) -> None:
        deal = event.data["FIELDS"]["ID"]
        try:
            await self.portal(event).call("crm.deal.get", {"id": deal})
            outcomes[deal] = "read"
        except PortalError as exc:
            outcomes[deal] = exc.code

    cls = type(
        "Hooked",
        (EventConsumer,),
        {"queue": broker.name("deals"), "events": ("ONCRMDEALUPDATE",), "handle": handle},
    )
    tokens = "app-token-w1,portal-b-token"
    settings = broker.make_settings(
        app_tokens=tokens, portal_store=f"sqlite:{tmp_path / 'p.db'}",
        portal_allow_private=True, portal_ca_file=str(portal_certificate[0]),
        portal_webhooks="https://w1.portal.test/rest/1/abcd1234/#app-token-w1",
    )  # fmt: skip
    forged = deal_event("w1", 2).payload  # portal B's admin, naming w1's domain
    forged["auth"]["application_token"] = "portal-b-token"
    async with (
        PortalClients(settings, resolver=StaticResolver()) as portals,
        Worker(settings, [cls], portals=portals),
    ):
        # Both pass the ingress; in the worker only the digest header says which token came.
        await post(broker, [deal_event("w1", 1), Event.from_payload(forged)], tokens)
        await wait_until(lambda: len(outcomes) == 2, 20, "both events handled")
    assert outcomes == {"1": "read", "2": "WRONG_PORTAL"}
    assert fake_portal.rest.deal_gets == ["1"]
