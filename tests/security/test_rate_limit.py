"""Finding 3 of issue 36 (one tenant's share): past its rate limit a verified portal gets 429 with
`Retry-After` and nothing is published, while every other portal goes on getting 200; requests
that are not verified spend no portal's budget; a static token is limited as the one tenant it
proves, whatever member_id it claims; the metric has no portal label and the log is bounded and
never holds a token. The last test goes through the embedded SQLite queue."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from b24queue._constants import H_MEMBER_ID
from b24queue.auth.portal import PortalVerifier
from b24queue.auth.store import SqliteTokenStore
from b24queue.auth.tokens import StaticTokens
from b24queue.events.envelope import EventSink
from b24queue.ingress.app import create_app
from b24queue.settings import Settings, load_settings
from b24queue.transports import transport_for
from tests.support.sinks import MemorySink
from tests.support.tenants import ALPHA, BETA, Trust, event

BURST = 3
# Slow enough that nothing refills while a test runs: its buckets only empty.
SLOW = {"ingress_rate_burst": BURST, "ingress_rate_per_s": 0.01}
MARKETPLACE = {"portal_verification": True, "portal_callback": False, **SLOW}
REFUSED = re.compile(r'^b24queue_ingress_refused_total\{reason="rate_limited"\} (\S+)$', re.M)


async def open_portals(
    settings: Settings, sink: EventSink, store: SqliteTokenStore
) -> TestClient[Any, Any]:
    """An ingress in per-portal mode (B24QUEUE_PORTAL_VERIFICATION) with ALPHA and BETA installed
    (through another app: this one starts with every bucket full)."""
    verifier = PortalVerifier(store, Trust())
    for auth in (ALPHA, BETA):
        install = event("ONAPPINSTALL", auth)
        client = TestClient(TestServer(create_app(settings, MemorySink(), verifier)))
        async with client:
            assert (await client.post("/b24/events", json=install)).status == 200
    client = TestClient(TestServer(create_app(settings, sink, verifier)))
    await client.start_server()
    return client


@pytest.fixture
async def portals(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], MemorySink]]:
    store = SqliteTokenStore(tmp_path / "portals.sqlite3")
    sink = MemorySink()
    client = await open_portals(load_settings(**MARKETPLACE), sink, store)
    try:
        yield client, sink
    finally:
        await client.close()
        await store.close()


async def post(client: TestClient[Any, Any], auth: dict[str, str]) -> Any:
    return await client.post("/b24/events", json=event("ONCRMDEALUPDATE", auth))


async def refused_count(client: TestClient[Any, Any]) -> float:
    text = await (await client.get("/metrics")).text()
    found = REFUSED.search(text)
    return float(found.group(1)) if found else 0.0


async def test_a_portal_past_its_limit_gets_429_while_another_still_gets_200(
    portals: tuple[TestClient[Any, Any], MemorySink],
) -> None:
    client, sink = portals
    for _ in range(BURST):
        assert (await post(client, ALPHA)).status == 200
    for _ in range(BURST):  # BETA's whole burst, one beside each refusal of ALPHA
        resp = await post(client, ALPHA)
        assert resp.status == 429, await resp.text()
        assert resp.content_type == "application/json"
        retry_after = resp.headers["Retry-After"]
        assert retry_after.isdigit() and int(retry_after) >= 1
        body = await resp.json()
        assert "too many events from this portal" in body["error"]
        assert ALPHA["application_token"] not in await resp.text()
        # At the same moment, another portal is untouched: tenants never act for each other.
        assert (await post(client, BETA)).status == 200
    published = [e.headers[H_MEMBER_ID] for e in sink.published]
    assert published == [ALPHA["member_id"]] * BURST + [BETA["member_id"]] * BURST
    metrics = await (await client.get("/metrics")).text()
    assert await refused_count(client) == BURST
    assert ALPHA["member_id"] not in metrics and ALPHA["domain"] not in metrics


async def test_requests_not_verified_spend_no_portals_budget(
    portals: tuple[TestClient[Any, Any], MemorySink],
) -> None:
    client, sink = portals
    forged = {**ALPHA, "application_token": "someone-elses-guess"}
    for _ in range(20):
        assert (await post(client, forged)).status == 401
    for _ in range(BURST):
        assert (await post(client, ALPHA)).status == 200
    assert (await post(client, ALPHA)).status == 429
    assert len(sink.published) == BURST


async def test_a_static_token_is_limited_as_itself_whatever_member_id_it_claims() -> None:
    first, second = "webhook-token-one", "webhook-token-two"

    async def ingress(**settings: Any) -> TestClient[Any, Any]:
        s = load_settings(app_tokens=f"{first},{second}", **settings)
        client = TestClient(TestServer(create_app(s, MemorySink(), StaticTokens(s.app_tokens))))
        await client.start_server()
        return client

    def claiming(token: str, member: int) -> dict[str, str]:
        return {
            "domain": f"p{member}.bitrix24.com",
            "member_id": f"{member:032x}",
            "application_token": token,
        }

    limited = await ingress(ingress_rate_limit="on", **SLOW)
    try:
        # A new member_id each time changes nothing: the token is what was verified.
        statuses = [(await post(limited, claiming(first, m))).status for m in range(BURST + 2)]
        assert statuses == [200] * BURST + [429] * 2
        assert (await post(limited, claiming(second, 0))).status == 200
    finally:
        await limited.close()
    # Static tokens only: off unless asked for (every token holder is a portal the operator
    # configured).
    default = await ingress(**SLOW)
    try:
        for _ in range(BURST * 3):
            assert (await post(default, claiming(first, 0))).status == 200
    finally:
        await default.close()


async def test_each_process_refills_at_its_share_of_the_rate(tmp_path: Path) -> None:
    # Four processes share 0.4 events/s: each refills at 0.1/s, so a drained bucket has its next
    # token in 10 s; alone, the process would refill at 0.4/s (3 s, rounded up).
    for processes, expected in ((4, "10"), (1, "3")):
        store = SqliteTokenStore(tmp_path / f"portals-{processes}.sqlite3")
        settings = load_settings(
            **{**MARKETPLACE, "ingress_rate_per_s": 0.4, "ingress_processes": processes}
        )
        client = await open_portals(settings, MemorySink(), store)
        try:
            for _ in range(BURST):
                assert (await post(client, ALPHA)).status == 200
            resp = await post(client, ALPHA)
            assert (resp.status, resp.headers["Retry-After"]) == (429, expected)
        finally:
            await client.close()
            await store.close()


async def test_refusals_are_logged_a_few_lines_at_most_and_never_the_token(
    portals: tuple[TestClient[Any, Any], MemorySink], caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = portals
    caplog.set_level(logging.WARNING, logger="b24queue.ingress.app")
    for _ in range(BURST):
        await post(client, ALPHA)
    for _ in range(50):
        assert (await post(client, ALPHA)).status == 429
    lines = [
        r.getMessage() for r in caplog.records if "B24QUEUE_INGRESS_RATE_PER_S" in r.getMessage()
    ]
    assert 1 <= len(lines) <= 5
    assert ALPHA["member_id"] in lines[0] and ALPHA["domain"] in lines[0]
    assert all(ALPHA["application_token"] not in r.getMessage() for r in caplog.records)


async def test_through_the_sqlite_queue_nothing_refused_is_stored(tmp_path: Path) -> None:
    settings = load_settings(broker_url=f"sqlite:{tmp_path / 'queue.db'}", **MARKETPLACE)
    store = SqliteTokenStore(tmp_path / "portals.sqlite3")
    try:
        async with transport_for(settings).publisher("ingress") as sink:
            client = await open_portals(settings, sink, store)
            try:
                statuses = [(await post(client, ALPHA)).status for _ in range(BURST + 4)]
                statuses.append((await post(client, BETA)).status)
            finally:
                await client.close()
        assert statuses == [200] * BURST + [429] * 4 + [200]
        # No consumer is bound: every stored event is in the unrouted store.
        async with transport_for(settings).dead_letters(settings.unrouted) as unrouted:
            assert await unrouted.count() == BURST + 1
    finally:
        await store.close()
