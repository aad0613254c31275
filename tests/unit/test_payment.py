"""ONAPPPAYMENT carries no application token: accepted only for a known portal, from its own
domain, once the portal confirms with the freshest access token the portal's events brought
(against the fake portal over HTTPS); otherwise a 401 that says why, and nothing published."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from b24queue.auth.install import PortalCallback
from b24queue.auth.portal import PortalVerifier
from b24queue.auth.store import Grant, SqliteTokenStore
from b24queue.auth.tokens import StaticTokens
from b24queue.ingress.app import create_app
from b24queue.settings import load_settings
from tests.support.fake_portal import CLIENT_ID, FakePortal, StaticResolver
from tests.support.samples import SAMPLE_TOKEN, SAMPLES
from tests.support.sinks import MemorySink

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
DOMAIN = "acme.portal.test"
MEMBER = "5f2a9c3e1b7d4a6f8e0c2b4d6f8a0c1e"


def payment_form(domain: str = DOMAIN, member: str = MEMBER) -> bytes:
    body = (SAMPLES / "payment" / "app-payment.form").read_bytes().strip()
    return body.replace(b"acme.bitrix24.com", domain.encode()).replace(
        MEMBER.encode(), member.encode()
    )


def event(name: str, *, access: str, expires: int, token: str = "portal-token") -> dict[str, Any]:
    return {
        "event": name,
        "data": {"FIELDS": {"ID": "1"}},
        "auth": {
            "domain": DOMAIN,
            "member_id": MEMBER,
            "application_token": token,
            "access_token": access,
            "expires": str(expires),
            "client_endpoint": f"https://{DOMAIN}/rest/",
        },
    }


class Ingress:
    def __init__(self, client: TestClient[Any, Any], sink: MemorySink, store: SqliteTokenStore):
        self.client, self.sink, self.store = client, sink, store

    async def post_json(self, body: dict[str, Any]) -> int:
        return (await self.client.post("/b24/events", json=body)).status

    async def pay(self, form: bytes | None = None) -> tuple[int, str]:
        resp = await self.client.post("/b24/events", data=form or payment_form(), headers=FORM)
        return resp.status, (await resp.json()).get("error", "")


@pytest.fixture
async def ingress(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> AsyncIterator[Ingress]:
    settings = load_settings(
        portal_verification=True,
        app_client_id=CLIENT_ID,
        portal_domains="*.portal.test",
        portal_allow_private=True,
        portal_ca_file=str(portal_certificate[0]),
        app_tokens="webhook-token",
    )
    store = SqliteTokenStore(tmp_path / "portals.sqlite3")
    sink = MemorySink()
    async with PortalCallback(settings, resolver=StaticResolver()) as callback:
        verifier = PortalVerifier(store, callback, StaticTokens(settings.app_tokens))
        async with TestClient(TestServer(create_app(settings, sink, verifier))) as client:
            yield Ingress(client, sink, store)
    await store.close()


async def test_a_payment_from_a_known_portal_is_confirmed_by_the_portal(
    ingress: Ingress, fake_portal: FakePortal
) -> None:
    soon = int(time.time()) + 3600
    assert (
        await ingress.post_json(event("ONAPPINSTALL", access="paid-install", expires=soon)) == 200
    )
    fake_portal.calls.clear()
    status, error = await ingress.pay()
    assert status == 200, error
    # Asked with the stored access token, on the stored domain; nothing from the request.
    assert fake_portal.calls == [{"host": f"{DOMAIN}:443", "token": "paid-install"}]
    published = json.loads(ingress.sink.published[-1].body)
    assert published["event"] == "ONAPPPAYMENT" and published["data"]["STATUS"] == "P"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("STATUS", "T"),
        ("PAYMENT_EXPIRED", "Y"),
        ("DAYS", "36500"),
        ("DAYS", "x"),
        ("CODE", "someone.else"),
    ],
)
async def test_a_payment_state_the_portal_does_not_show_is_refused(
    ingress: Ingress, field: str, value: str
) -> None:
    """The event is unsigned: a caller who knows a portal's domain and member_id must not be
    able to publish another payment state for it."""
    install = event("ONAPPINSTALL", access="paid-install", expires=int(time.time()) + 3600)
    assert await ingress.post_json(install) == 200
    forged = payment_form().replace(
        f"data%5B{field}%5D=".encode(), f"data%5B{field}%5D={value}&x=".encode()
    )
    published = len(ingress.sink.published)
    status, error = await ingress.pay(forged)
    assert status == 401 and f"data[{field}]" in error, error
    assert len(ingress.sink.published) == published
    # A day's difference in DAYS is the same state (it counts down while the event waits).
    status, error = await ingress.pay(
        payment_form().replace(b"data%5BDAYS%5D=365", b"data%5BDAYS%5D=364")
    )
    assert status == 200, error


async def test_later_events_keep_the_stored_access_token_fresh(
    ingress: Ingress, fake_portal: FakePortal
) -> None:
    now = int(time.time())
    assert await ingress.post_json(event("ONAPPINSTALL", access="paid-1", expires=now + 120)) == 200
    # An event with a later token, while the stored one has under half an hour left: kept.
    assert (
        await ingress.post_json(event("ONCRMDEALADD", access="paid-2", expires=now + 3600)) == 200
    )
    record = await ingress.store.get(MEMBER)
    assert record is not None and record.access_token == "paid-2"
    # One with a still later token while the stored one is fresh: no write (one per half hour).
    assert (
        await ingress.post_json(event("ONCRMDEALADD", access="paid-3", expires=now + 3700)) == 200
    )
    record = await ingress.store.get(MEMBER)
    assert record is not None and record.access_token == "paid-2"
    fake_portal.calls.clear()
    assert (await ingress.pay())[0] == 200
    assert [c["token"] for c in fake_portal.calls] == ["paid-2"]


@pytest.mark.parametrize(
    ("setup", "form", "words"),
    [
        ("none", None, "unknown portal"),
        ("expired", None, "has expired"),
        ("wrong-app", None, "did not confirm"),
        ("unpaid", None, "data[STATUS]"),
        ("good", payment_form(domain="other.portal.test"), "auth[domain]"),
        ("good", payment_form(member="0" * 32), "unknown portal"),
    ],
)
async def test_a_payment_that_cannot_be_confirmed_is_refused_and_says_why(
    ingress: Ingress, setup: str, form: bytes | None, words: str
) -> None:
    now = int(time.time())
    if setup != "none":
        expires = now + 30 if setup == "expired" else now + 3600
        assert (
            await ingress.post_json(event("ONAPPINSTALL", access="paid-1", expires=expires)) == 200
        )
    if setup == "wrong-app":  # the portal now says the stored token is another app's
        assert await ingress.store.refresh_access(
            MEMBER, "portal-token", Grant("wrong-app", now + 7200)
        )
    if setup == "unpaid":  # the portal answers for our app, but shows no payment (STATUS "L")
        assert await ingress.store.refresh_access(
            MEMBER, "portal-token", Grant("good-9", now + 7200)
        )
    published = len(ingress.sink.published)
    status, error = await ingress.pay(form)
    assert status == 401 and words in error, error
    assert len(ingress.sink.published) == published


async def test_with_static_tokens_only_a_payment_is_refused_with_the_reason(
    tmp_path: Path,
) -> None:
    sink = MemorySink()
    app = create_app(load_settings(app_tokens=SAMPLE_TOKEN), sink, StaticTokens((SAMPLE_TOKEN,)))
    async with TestClient(TestServer(app)) as client:
        resp = await client.post(
            "/b24/events",
            data=(SAMPLES / "payment" / "app-payment.form").read_bytes().strip(),
            headers=FORM,
        )
        assert resp.status == 401
        assert "ONAPPPAYMENT carries no application token" in (await resp.json())["error"]
    assert sink.published == []


async def test_an_event_claiming_a_far_expiry_cannot_keep_fresher_tokens_out(
    ingress: Ingress,
) -> None:
    now = int(time.time())
    install = event("ONAPPINSTALL", access="paid-1", expires=now + 100 * 365 * 86400)
    assert await ingress.post_json(install) == 200
    record = await ingress.store.get(MEMBER)
    assert record is not None and record.access_expires <= now + 2 * 3600 + 5
