"""Refreshing portal tokens through the fake OAuth server: on expiry, concurrently from two
"processes" (separate store and state connections, separate clients), with the secrets never
shown, and nothing left to refresh with once the portal is uninstalled."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from b24queue.auth.portal import PortalVerifier
from b24queue.auth.record import PortalRecord
from b24queue.auth.store import RedisTokenStore, SqliteTokenStore, TokenStore
from b24queue.events import Event
from b24queue.portal.api import PortalError
from b24queue.portal.clients import PortalClients
from b24queue.portal.limits import SharedState
from b24queue.portal.oauth import _tokens
from b24queue.portal.redis_state import RedisState
from b24queue.portal.sqlite_state import SqliteState
from tests.fake_portal import FakePortal, StaticResolver
from tests.fake_rest import CLIENT_SECRET
from tests.portal_setup import deal_event, install, portal_settings


def handles(kind: str, tmp_path: Path, prefix: str) -> tuple[TokenStore, SharedState]:
    if kind == "sqlite":
        return SqliteTokenStore(tmp_path / "p.db"), SqliteState(tmp_path / "p.db")
    url = "redis://127.0.0.1:6379/0"
    return RedisTokenStore(url, prefix + "portal:"), RedisState(url, prefix + "state:")


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_concurrent_refreshes_in_two_processes_leave_one_valid_token(
    kind: str, fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    rest = fake_portal.rest
    rest.burst, rest.drain_per_s = 200, 100.0  # the bucket is not what this test is about
    settings = portal_settings(
        portal_certificate[0], f"sqlite:{tmp_path / 'p.db'}", portal_burst=200
    )
    prefix = f"b24q-test-{uuid.uuid4().hex}:"
    parts = [handles(kind, tmp_path, prefix) for _ in range(2)]
    record = await install(parts[0][0], rest, "m1")
    rest.expire(record.access_token)  # expired while its events waited
    try:
        async with (
            PortalClients(
                settings, store=parts[0][0], state=parts[0][1], resolver=StaticResolver()
            ) as one,
            PortalClients(
                settings, store=parts[1][0], state=parts[1][1], resolver=StaticResolver()
            ) as two,
        ):
            calls = [
                clients.for_event(deal_event("m1", i)).call("crm.deal.get", {"id": i})
                for i in range(1, 33)
                for clients in (one, two)
            ]
            deals = await asyncio.gather(*calls)
            assert len(deals) == 64
            assert rest.refreshes == 1 and rest.refused_refreshes == 0
            assert one.refresher.refreshes + two.refresher.refreshes == 1
        stored = await parts[1][0].get("m1")
        assert stored is not None and rest.valid_refresh_tokens("m1") == [stored.refresh_token]
        assert stored.access_token in rest.tokens and stored.access_token != record.access_token
    finally:
        for store, state in parts:
            await store.forget("m1")
            await store.close()
            await state.close()


async def test_refresh_needs_the_app_secret_and_never_shows_it(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    rest = fake_portal.rest
    store = SqliteTokenStore(tmp_path / "p.db")
    record = await install(store, rest, "m1")
    rest.expire(record.access_token)
    spec = f"sqlite:{tmp_path / 'p.db'}"
    cert = portal_certificate[0]
    async with PortalClients(
        portal_settings(cert, spec, app_client_secret=""), resolver=StaticResolver()
    ) as clients:
        with pytest.raises(PortalError, match="B24QUEUE_APP_CLIENT_SECRET"):
            await clients.for_event(deal_event("m1", 1)).call("crm.deal.get", {"id": 1})
    wrong = portal_settings(cert, spec, app_client_secret="not-the-secret")
    async with PortalClients(wrong, resolver=StaticResolver()) as clients:
        with pytest.raises(PortalError) as caught:
            await clients.for_event(deal_event("m1", 1)).call("crm.deal.get", {"id": 1})
    assert caught.value.code == "invalid_client"
    unreachable = portal_settings(cert, spec, oauth_url="https://127.0.0.1:1/oauth/token/")
    async with PortalClients(unreachable, resolver=StaticResolver()) as clients:
        with pytest.raises(PortalError) as gone:
            await clients.for_event(deal_event("m1", 1)).call("crm.deal.get", {"id": 1})
    for error in (caught.value, gone.value):
        text = f"{error} {error!r} {error.__cause__!r} {error.__context__!r}"
        assert CLIENT_SECRET not in text and "not-the-secret" not in text
        assert record.refresh_token not in text and record.access_token not in text
    # The refresh token was never spent by the failures.
    assert rest.valid_refresh_tokens("m1") == [record.refresh_token]
    await store.close()


async def test_uninstall_forgets_the_credentials(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    rest = fake_portal.rest
    store = SqliteTokenStore(tmp_path / "p.db")
    record = await install(store, rest, "m1")
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'p.db'}")
    async with PortalClients(settings, store=store, resolver=StaticResolver()) as clients:
        await clients.for_event(deal_event("m1", 1)).call("crm.deal.get", {"id": 1})
        verifier = PortalVerifier(store, None)
        uninstall = Event.from_payload(
            {
                "event": "ONAPPUNINSTALL",
                "auth": {
                    "domain": record.domain,
                    "member_id": "m1",
                    "application_token": record.token,
                },
            }
        )
        await verifier.verify(uninstall)
        await verifier.accepted(uninstall)
        assert await store.get("m1") is None
        with pytest.raises(PortalError, match="NO_CREDENTIALS"):
            await clients.for_event(deal_event("m1", 2)).call("crm.deal.get", {"id": 2})
        # Nor does a replayed event's own (still valid) token reach a forgotten portal.
        own, _, expires = rest.issue("m1")
        replay = deal_event("m1", 3, access=own, expires=expires)
        with pytest.raises(PortalError, match="NO_CREDENTIALS"):
            await clients.for_event(replay).call("crm.deal.get", {"id": 3})
    assert rest.deal_gets == ["1"]


def test_an_oauth_answer_for_another_portal_is_refused() -> None:
    record = PortalRecord("m1", "m1.portal.test", "t", refresh_token="r1")
    answer = b'{"access_token": "a2", "refresh_token": "r2", "expires_in": 3600, "member_id": "m2"}'
    with pytest.raises(PortalError, match="WRONG_PORTAL"):
        _tokens(record, 200, answer, 1000.0)
    ok = b'{"access_token": "a2", "refresh_token": "r2", "expires_in": 99999, "member_id": "m1"}'
    assert _tokens(record, 200, ok, 1000.0) == ("a2", "r2", 1000 + 7200)  # capped at 2 h
    with pytest.raises(PortalError, match="invalid_grant"):
        _tokens(record, 400, b'{"error": "invalid_grant"}', 1000.0)
    with pytest.raises(PortalError, match="BAD_ANSWER"):
        _tokens(record, 200, b'{"access_token": "a b"}', 1000.0)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_lost_refresh_token_is_replaced_by_the_portals_next_event(
    kind: str, fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    rest = fake_portal.rest
    store, state = handles(kind, tmp_path, f"b24q-test-{uuid.uuid4().hex}:")
    record = await install(store, rest, "m1", lifetime_s=600)  # 10 min left: due for renewal
    # The stored refresh token is spent elsewhere (a refresh whose answer never came back).
    rest.refresh_tokens.pop(record.refresh_token)
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'p.db'}")
    try:
        # The portal's next event brings a new pair; the ingress keeps both tokens of it.
        access, refresh, expires = rest.issue("m1")
        event = deal_event("m1", 1, access=access, expires=expires)
        payload = {**event.payload, "auth": {**event.payload["auth"], "refresh_token": refresh}}
        await PortalVerifier(store, None).verify(Event.from_payload(payload))
        kept = await store.get("m1")
        assert kept is not None and (kept.access_token, kept.refresh_token) == (access, refresh)
        rest.expire(access)  # ... and an hour later that one has expired too
        async with PortalClients(
            settings, store=store, state=state, resolver=StaticResolver()
        ) as clients:
            deal = await clients.for_event(deal_event("m1", 2)).call("crm.deal.get", {"id": 2})
        assert deal["ID"] == "2" and rest.refreshes == 1
    finally:
        await store.forget("m1")
        await store.close()
        await state.close()
