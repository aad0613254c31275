"""Findings 4 and 7: in per-portal mode a tenant speaks only for its own portal, only a portal's
own token uninstalls it, racing installs cannot overwrite each other (SQLite and Redis), the
token store and spool are private files, and the application token is never published."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from b24queue.auth.portal import PortalVerifier
from b24queue.auth.store import (
    Grant,
    PortalRecord,
    RedisTokenStore,
    SqliteTokenStore,
    TokenStore,
)
from b24queue.auth.tokens import StaticTokens
from b24queue.events import Event
from b24queue.events.envelope import envelope_for
from b24queue.ingress.app import create_app
from b24queue.settings import load_settings
from tests.support.samples import SAMPLE_TOKEN, sample_decoded, sample_form
from tests.support.sinks import MemorySink
from tests.support.tenants import ALPHA, BETA, Trust, event

WEBHOOK_TOKEN = "webhook-static-token"


@pytest.fixture
async def portals(
    tmp_path: Path,
) -> AsyncIterator[tuple[TestClient[Any, Any], MemorySink, TokenStore]]:
    store = SqliteTokenStore(tmp_path / "portals.sqlite3")
    sink = MemorySink()
    verifier = PortalVerifier(store, Trust(), StaticTokens((WEBHOOK_TOKEN,)))
    app = create_app(load_settings(allow_unverified=True), sink, verifier)
    async with TestClient(TestServer(app)) as client:
        for auth in (ALPHA, BETA):
            resp = await client.post("/b24/events", json=event("ONAPPINSTALL", auth))
            assert resp.status == 200, await resp.text()
        sink.published.clear()
        yield client, sink, store
    await store.close()


async def test_a_tenant_cannot_send_events_as_another_portals_domain(
    portals: tuple[TestClient[Any, Any], MemorySink, TokenStore],
) -> None:
    client, sink, _ = portals
    forged = event("ONCRMDEALADD", {**ALPHA, "domain": BETA["domain"]})
    resp = await client.post("/b24/events", json=forged)
    assert resp.status == 401 and "auth[domain]" in (await resp.json())["error"]
    forged = event("ONCRMDEALADD", ALPHA, client_endpoint="https://beta.bitrix24.com/rest/")
    resp = await client.post("/b24/events", json=forged)
    assert resp.status == 401 and "client_endpoint" in (await resp.json())["error"]
    assert sink.published == []
    assert (await client.post("/b24/events", json=event("ONCRMDEALADD", ALPHA))).status == 200


async def test_a_repeated_install_speaks_only_for_its_own_portal(
    portals: tuple[TestClient[Any, Any], MemorySink, TokenStore],
) -> None:
    client, sink, _ = portals
    forged = event("ONAPPINSTALL", {**ALPHA, "domain": BETA["domain"]})
    assert (await client.post("/b24/events", json=forged)).status == 401
    forged = event("ONAPPINSTALL", ALPHA, client_endpoint="https://evil.example/rest/")
    assert (await client.post("/b24/events", json=forged)).status == 401
    assert sink.published == []
    assert (await client.post("/b24/events", json=event("ONAPPINSTALL", ALPHA))).status == 200


async def test_a_portal_may_spell_its_idn_name_either_way(tmp_path: Path) -> None:
    store = SqliteTokenStore(tmp_path / "portals.sqlite3")
    verifier = PortalVerifier(store, Trust())
    auth = {"domain": "пример.bitrix24.ru", "member_id": "f" * 32, "application_token": "idn"}
    try:
        puny = "https://xn--e1afmkfd.bitrix24.ru/rest/"
        await verifier.verify(Event.from_payload(event("ONAPPINSTALL", auth, client_endpoint=puny)))
        await verifier.verify(Event.from_payload(event("ONCRMDEALADD", auth, client_endpoint=puny)))
        await verifier.verify(
            Event.from_payload(
                event("ONCRMDEALADD", {**auth, "domain": "xn--e1afmkfd.bitrix24.ru"})
            )
        )
    finally:
        await store.close()


class BrokenStore(SqliteTokenStore):
    async def get(self, member_id: str) -> PortalRecord | None:
        raise ConnectionError("Error 111 connecting to 10.0.0.7:6379. Connection refused.")


async def test_a_token_store_outage_is_a_503_that_tells_no_detail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = BrokenStore(tmp_path / "portals.sqlite3")
    sink = MemorySink()
    app = create_app(load_settings(allow_unverified=True), sink, PortalVerifier(store, Trust()))
    async with TestClient(TestServer(app)) as client:
        for _ in range(30):
            resp = await client.post("/b24/events", json=event("ONCRMDEALADD", ALPHA))
            assert resp.status == 503 and resp.headers["Retry-After"]
            body = await resp.text()
            assert "10.0.0.7" not in body and "Traceback" not in body
    await store.close()
    assert sink.published == []
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert tracebacks == []
    assert len([r for r in caplog.records if "portal token store:" in r.getMessage()]) <= 6


async def test_a_static_token_cannot_uninstall_a_portal(
    portals: tuple[TestClient[Any, Any], MemorySink, TokenStore],
) -> None:
    client, _, store = portals
    # An outgoing webhook's token is valid for events, but not to make us forget alpha.
    uninstall = event("ONAPPUNINSTALL", {**ALPHA, "application_token": WEBHOOK_TOKEN})
    assert (await client.post("/b24/events", json=uninstall)).status == 200
    assert await store.get(ALPHA["member_id"]) is not None
    # Nor can beta's own token uninstall alpha.
    uninstall = event("ONAPPUNINSTALL", {**ALPHA, "application_token": BETA["application_token"]})
    assert (await client.post("/b24/events", json=uninstall)).status == 401
    assert await store.get(ALPHA["member_id"]) is not None
    # Alpha's own token does.
    assert (await client.post("/b24/events", json=event("ONAPPUNINSTALL", ALPHA))).status == 200
    assert await store.get(ALPHA["member_id"]) is None
    assert await store.get(BETA["member_id"]) is not None


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TokenStore]:
    if request.param == "sqlite":
        s: TokenStore = SqliteTokenStore(tmp_path / "portals.sqlite3")
    else:
        s = RedisTokenStore("redis://127.0.0.1:6379/0", prefix=f"b24q-test-{uuid.uuid4().hex}:")
    try:
        yield s
    finally:
        for record in await s.all():
            await s.forget(record.member_id)
        await s.close()


async def test_racing_installs_store_one_token_and_refuse_the_other(store: TokenStore) -> None:
    member = "c" * 32
    # No call-back: a first install is trusted, a new token for a known portal is not. The old
    # read-then-upsert let several racing "first" installs all answer 200, the last write
    # silently replacing the token the others were accepted with.
    verifier = PortalVerifier(store, None)
    installs = [
        Event.from_payload(
            event(
                "ONAPPINSTALL",
                {
                    "domain": "gamma.bitrix24.com",
                    "member_id": member,
                    "application_token": f"token-{i}",
                },
            )
        )
        for i in range(8)
    ]
    results = await asyncio.gather(*(verifier.verify(e) for e in installs), return_exceptions=True)
    # An accepted install answers the tenant it proved: its member_id.
    accepted = [e for e, r in zip(installs, results, strict=True) if r == member]
    assert len(accepted) == 1, results
    record = await store.get(member)
    assert record is not None and record.token == accepted[0].auth.application_token


async def test_compare_and_set_writes(store: TokenStore) -> None:
    first = PortalRecord("d" * 32, "delta.bitrix24.com", "t1")
    assert await store.remember(first)
    assert not await store.remember(PortalRecord(first.member_id, first.domain, "t2"))
    assert not await store.remember(PortalRecord(first.member_id, first.domain, "t3"), "wrong")
    assert await store.remember(PortalRecord(first.member_id, first.domain, "t3"), "t1")
    # A fresher access token is kept only while the token is the portal's and it is fresher.
    assert await store.refresh_access(first.member_id, "t3", Grant("access-1", 2000))
    assert not await store.refresh_access(first.member_id, "t3", Grant("access-0", 1000))
    assert not await store.refresh_access(first.member_id, "t1", Grant("access-2", 3000))
    record = await store.get(first.member_id)
    assert record is not None and (record.access_token, record.access_expires) == ("access-1", 2000)
    assert "access-1" not in repr(record)
    assert not await store.forget(first.member_id, token="t1")
    assert await store.forget(first.member_id, token="t3")


async def test_a_store_made_by_an_older_version_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "portals.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE portals (member_id TEXT PRIMARY KEY, domain TEXT NOT NULL, "
        "token TEXT NOT NULL, installed_at TEXT NOT NULL)"
    )
    db.execute("INSERT INTO portals VALUES ('m1', 'old.bitrix24.com', 'tok', '2026-01-01')")
    db.commit()
    db.close()
    store = SqliteTokenStore(path)
    try:
        record = await store.get("m1")
        assert record is not None and (record.token, record.access_token) == ("tok", "")
        assert await store.refresh_access("m1", "tok", Grant("fresh", 100))
    finally:
        await store.close()


async def test_token_store_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        store = SqliteTokenStore(tmp_path / "p" / "portals.sqlite3")
        await store.remember(PortalRecord("e" * 32, "eps.bitrix24.com", "secret"))
        await store.close()
    finally:
        os.umask(old)
    for path in (tmp_path / "p").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_the_application_token_is_not_published() -> None:
    from b24queue.events.event import FORM_TYPE, parse_event

    for name in ("crm-deal-add", "imbot-message-add", "app-install"):
        published = envelope_for(parse_event(FORM_TYPE, sample_form(name)))
        assert SAMPLE_TOKEN.encode() not in published.body, name
        body = published.body.decode()
        decoded = sample_decoded(name)
        # The other auth fields are all there; no token is (the OAuth pair neither: a worker
        # calls the portal with the stored credentials).
        for key, value in decoded["auth"].items():
            if key in ("application_token", "access_token", "refresh_token"):
                assert value not in body, key
            else:
                assert f'"{key}":"{value}"' in body, key
