"""Refreshing portal tokens through the fake OAuth server: on expiry, concurrently from two
"processes" (separate store and state connections, separate clients), with the secrets never
shown, and nothing left to refresh with once the portal is uninstalled."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path

import pytest

from b24queue.auth.portal import PortalVerifier
from b24queue.auth.record import Grant, PortalRecord
from b24queue.auth.store import RedisTokenStore, SqliteTokenStore, TokenStore
from b24queue.events import Event
from b24queue.portal import oauth, oauth_server
from b24queue.portal.api import PortalError, PortalRetry
from b24queue.portal.clients import PortalClients
from b24queue.portal.oauth_server import _tokens
from b24queue.portal.redis_state import RedisState
from b24queue.portal.sqlite_state import SqliteState
from b24queue.portal.state import SharedState
from tests.support.fake_portal import FakePortal, StaticResolver
from tests.support.fake_rest import CLIENT_SECRET
from tests.support.portal_setup import deal_event, install, portal_settings


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
    assert _tokens(record, 200, ok, 1000.0) == Grant("a2", 1000 + 7200, "r2")  # capped at 2 h
    with pytest.raises(PortalError, match="invalid_grant"):
        _tokens(record, 400, b'{"error": "invalid_grant"}', 1000.0)
    with pytest.raises(PortalError, match="BAD_ANSWER"):
        _tokens(record, 200, b'{"access_token": "a b"}', 1000.0)
    with pytest.raises(PortalError, match="BAD_ANSWER"):  # nested past any recursion limit
        _tokens(record, 200, b"[" * 30_000 + b"]" * 30_000, 1000.0)


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


async def test_a_refresh_never_gives_another_installs_token_to_the_old_target(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    rest = fake_portal.rest
    store = SqliteTokenStore(tmp_path / "p.db")
    first = await install(store, rest, "m1")
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'p.db'}")
    async with PortalClients(settings, store=store, resolver=StaticResolver()) as clients:
        portal = clients.for_event(deal_event("m1", 1))
        await portal.call("crm.deal.get", {"id": 1})  # its target and token are chosen
        # Meanwhile the portal is forgotten and installed again under the same member_id, by
        # another party, on another domain, with another application token.
        assert await store.forget("m1")
        access, refresh, expires = rest.issue("m1")
        other = PortalRecord(
            "m1", "elsewhere.portal.test", "another-app-token",
            access_token=access, access_expires=expires, refresh_token=refresh,
        )  # fmt: skip
        assert await store.remember(other)
        rest.expire(first.access_token)
        with pytest.raises(PortalError, match="WRONG_PORTAL"):
            await portal.call("crm.deal.get", {"id": 2})
    assert access not in rest.used_tokens and rest.deal_gets == ["1"]
    await store.close()


class FlakyStore(SqliteTokenStore):
    """Its first `failures` writes of a refreshed pair fail (a locked file, Redis away)."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    async def refreshed(self, member_id: str, old: str, grant: Grant) -> bool:
        if self.failures > 0:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        return await super().refreshed(member_id, old, grant)


async def test_a_refreshed_pair_is_stored_after_a_failed_write(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    rest = fake_portal.rest
    store = FlakyStore(tmp_path / "p.db", failures=2)
    record = await install(store, rest, "m1")
    rest.expire(record.access_token)
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'p.db'}")
    async with PortalClients(settings, store=store, resolver=StaticResolver()) as clients:
        assert await clients.for_event(deal_event("m1", 1)).call("crm.deal.get", {"id": 1})
    stored = await store.get("m1")
    assert stored is not None and rest.valid_refresh_tokens("m1") == [stored.refresh_token]
    assert store.failures == 0 and rest.refreshes == 1
    await store.close()


async def test_a_pair_that_cannot_be_stored_is_kept_in_the_process(
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rest = fake_portal.rest
    store = FlakyStore(tmp_path / "p.db", failures=1000)
    record = await install(store, rest, "m1")
    rest.expire(record.access_token)
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'p.db'}")
    async with PortalClients(settings, store=store, resolver=StaticResolver()) as clients:
        await clients.for_event(deal_event("m1", 1)).call("crm.deal.get", {"id": 1})
        (live,) = rest.valid_refresh_tokens("m1")
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert errors and "could not be stored" in errors[-1].getMessage()
        # Its access token expires too: the pair kept in memory is refreshed again.
        rest.expire(rest.used_tokens[-1])
        await clients.for_event(deal_event("m1", 2)).call("crm.deal.get", {"id": 2})
    assert rest.refreshes == 2 and rest.refused_refreshes == 0 and live in rest.spent
    for secret in (record.refresh_token, live, *rest.used_tokens, CLIENT_SECRET):
        assert secret not in caplog.text
    await store.close()


async def test_a_refresh_outlives_its_cancelled_caller(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    rest = fake_portal.rest
    store = SqliteTokenStore(tmp_path / "p.db")
    record = await install(store, rest, "m1")
    rest.expire(record.access_token)
    rest.oauth_gate = asyncio.Event()
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'p.db'}")
    async with PortalClients(settings, store=store, resolver=StaticResolver()) as clients:
        call = asyncio.create_task(
            clients.for_event(deal_event("m1", 1)).call("crm.deal.get", {"id": 1})
        )
        await asyncio.wait_for(rest.oauth_arrived.wait(), 10)
        call.cancel()  # the handler's timeout, or a shutdown, while the OAuth server answers
        with pytest.raises(asyncio.CancelledError):
            await call
        rest.oauth_gate.set()
        # The refresh token was spent; the pair the server gave for it was not lost.
        await clients.for_event(deal_event("m1", 2)).call("crm.deal.get", {"id": 2})
    stored = await store.get("m1")
    assert stored is not None and rest.valid_refresh_tokens("m1") == [stored.refresh_token]
    assert rest.refreshes == 1 and rest.refused_refreshes == 0
    await store.close()


async def test_callers_share_one_refresh_and_its_failure(
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(oauth_server, "OAUTH_TIMEOUT_S", 0.5)  # the OAuth server is blackholed
    rest = fake_portal.rest
    rest.oauth_gate = asyncio.Event()
    store = SqliteTokenStore(tmp_path / "p.db")
    record = await install(store, rest, "m1")
    rest.expire(record.access_token)
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'p.db'}")
    try:
        async with PortalClients(settings, store=store, resolver=StaticResolver()) as clients:
            calls = [
                clients.for_event(deal_event("m1", i)).call("crm.deal.get", {"id": i})
                for i in range(1, 17)
            ]
            errors = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    finally:
        rest.oauth_gate.set()
    assert {e.code for e in errors if isinstance(e, PortalError)} == {"OAUTH_UNREACHABLE"}
    assert len(errors) == 16 and rest.oauth_requests == 1
    await store.close()


async def test_waiting_for_a_refresh_has_a_deadline(
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(oauth, "WAIT_S", 0.3)
    rest = fake_portal.rest
    rest.oauth_gate = asyncio.Event()
    store = SqliteTokenStore(tmp_path / "p.db")
    record = await install(store, rest, "m1")
    rest.expire(record.access_token)
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'p.db'}")
    async with PortalClients(settings, store=store, resolver=StaticResolver()) as clients:
        calls = [
            clients.for_event(deal_event("m1", i)).call("crm.deal.get", {"id": i})
            for i in range(1, 9)
        ]
        try:
            errors = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 3)
        finally:
            rest.oauth_gate.set()
        assert all(isinstance(e, PortalRetry) and e.code == "REFRESH_SLOW" for e in errors)
        assert rest.oauth_requests == 1
        # The refresh itself went on, and its pair was stored.
        await clients.for_event(deal_event("m1", 9)).call("crm.deal.get", {"id": 9})
    stored = await store.get("m1")
    assert stored is not None and rest.valid_refresh_tokens("m1") == [stored.refresh_token]
    await store.close()


async def test_a_refused_refresh_token_is_not_tried_again(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    rest = fake_portal.rest
    store = SqliteTokenStore(tmp_path / "p.db")
    record = await install(store, rest, "m1")
    rest.expire(record.access_token)
    rest.refresh_tokens.pop(record.refresh_token)  # spent elsewhere
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'p.db'}")
    async with PortalClients(settings, store=store, resolver=StaticResolver()) as clients:
        with pytest.raises(PortalError, match="invalid_grant"):
            await clients.for_event(deal_event("m1", 1)).call("crm.deal.get", {"id": 1})
        for i in (2, 3):
            with pytest.raises(PortalError, match="NO_CREDENTIALS"):
                await clients.for_event(deal_event("m1", i)).call("crm.deal.get", {"id": i})
    assert rest.oauth_requests == 1 and rest.refused_refreshes == 1
    await store.close()


def test_the_refresh_lease_outlives_the_slowest_refresh() -> None:
    # The lease is held over the re-read, the OAuth call and the store's write: each store
    # access may wait out SQLite's busy timeout, the OAuth call its own timeout.
    slowest = oauth_server.OAUTH_TIMEOUT_S + 2 * oauth.STORE_BUSY_S
    assert slowest + 5 <= oauth.LEASE_S
    tries = len(oauth.WRITE_PAUSES_S) + 1
    assert slowest + (tries - 1) * oauth.STORE_BUSY_S + sum(oauth.WRITE_PAUSES_S) <= oauth.LEASE_S


async def test_a_refused_refresh_token_is_not_tried_again_even_if_the_store_fails(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    rest = fake_portal.rest
    store = FlakyStore(tmp_path / "p.db", failures=1000)  # it cannot be cleared in the store
    record = await install(store, rest, "m1")
    rest.expire(record.access_token)
    rest.refresh_tokens.pop(record.refresh_token)  # spent elsewhere
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'p.db'}")
    async with PortalClients(settings, store=store, resolver=StaticResolver()) as clients:
        with pytest.raises(PortalError, match="invalid_grant"):
            await clients.for_event(deal_event("m1", 1)).call("crm.deal.get", {"id": 1})
        with pytest.raises(PortalError, match="NO_CREDENTIALS"):
            await clients.for_event(deal_event("m1", 2)).call("crm.deal.get", {"id": 2})
    assert rest.oauth_requests == 1
    await store.close()
