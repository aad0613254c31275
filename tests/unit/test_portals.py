"""Per-portal verification with the SQLite store and the HTTPS call-back against a fake portal
on loopback (no RabbitMQ here: tests/integration/test_portals.py runs the whole ingress)."""

from __future__ import annotations

from pathlib import Path

import pytest

from b24queue.auth.install import PortalCallback, domain_pattern
from b24queue.auth.portal import PortalVerifier
from b24queue.auth.store import PortalRecord, SqliteTokenStore, open_store
from b24queue.auth.tokens import StaticTokens
from b24queue.errors import ConfigError, UnauthorizedError
from b24queue.events import Event
from tests.support.fake_portal import FakePortal, StaticResolver
from tests.support.portal_setup import portal_event, verifier_settings


class Allow:
    def __init__(self) -> None:
        self.calls = 0

    async def confirm(self, event: Event) -> None:
        self.calls += 1


class Deny:
    async def confirm(self, event: Event) -> None:
        raise UnauthorizedError("the portal says no")


async def test_install_update_uninstall_for_two_portals(tmp_path: Path) -> None:
    store = SqliteTokenStore(tmp_path / "p.db")
    check = Allow()
    v = PortalVerifier(store, check)
    try:
        # The tenant each event speaks for (the key of its rate limit): the portal proven.
        assert await v.verify(portal_event("ONAPPINSTALL", member="m1", token="t1")) == "m1"
        await v.verify(
            portal_event("ONAPPINSTALL", member="m2", token="t2", domain="b.portal.test")
        )
        assert await v.verify(portal_event("ONCRMDEALUPDATE", member="m1", token="t1")) == "m1"
        await v.verify(
            portal_event("ONCRMDEALUPDATE", member="m2", token="t2", domain="b.portal.test")
        )
        with pytest.raises(UnauthorizedError, match="does not match this portal"):
            await v.verify(portal_event("ONCRMDEALUPDATE", member="m1", token="t2"))
        uninstall = portal_event("ONAPPUNINSTALL", member="m1", token="t1")
        await v.verify(uninstall)
        await v.accepted(uninstall)
        with pytest.raises(UnauthorizedError, match="unknown portal"):
            await v.verify(portal_event("ONCRMDEALUPDATE", member="m1", token="t1"))
        assert [r.member_id for r in await store.all()] == ["m2"]
        assert check.calls == 2
    finally:
        await store.close()


async def test_the_store_survives_a_restart_and_never_shows_tokens(tmp_path: Path) -> None:
    store = SqliteTokenStore(tmp_path / "p.db")
    await store.remember(PortalRecord("m1", "acme.portal.test", "secret-token"))
    await store.close()
    again = open_store(f"sqlite:{tmp_path / 'p.db'}")
    try:
        record = await again.get("m1")
        assert record is not None and record.token == "secret-token"
        assert "secret-token" not in repr(record)
    finally:
        await again.close()
    with pytest.raises(ConfigError, match="neither sqlite"):
        open_store("postgres://x")


async def test_reinstall_and_replayed_install(tmp_path: Path) -> None:
    store = SqliteTokenStore(tmp_path / "p.db")
    try:
        await PortalVerifier(store, Allow()).verify(portal_event("ONAPPINSTALL", token="old"))
        # A replayed install with the known token: accepted, nothing changes, nobody asked.
        check = Allow()
        await PortalVerifier(store, check).verify(portal_event("ONAPPINSTALL", token="old"))
        assert check.calls == 0
        # A new token for a known portal: only if the portal confirms it.
        with pytest.raises(UnauthorizedError, match="says no"):
            await PortalVerifier(store, Deny()).verify(portal_event("ONAPPINSTALL", token="new"))
        assert (await store.get("m1")).token == "old"  # type: ignore[union-attr]
        await PortalVerifier(store, Allow()).verify(portal_event("ONAPPINSTALL", token="new"))
        assert (await store.get("m1")).token == "new"  # type: ignore[union-attr]
        # Another portal (confirmed by *its* portal) cannot take over a known member_id.
        with pytest.raises(UnauthorizedError, match="from another domain"):
            await PortalVerifier(store, Allow()).verify(
                portal_event("ONAPPINSTALL", token="evil", domain="evil.portal.test")
            )
        assert (await store.get("m1")).token == "new"  # type: ignore[union-attr]
        # Without the call-back, a new token for a known portal is refused outright.
        with pytest.raises(UnauthorizedError, match="reinstall is only accepted"):
            await PortalVerifier(store, None).verify(portal_event("ONAPPINSTALL", token="newer"))
    finally:
        await store.close()


async def test_static_tokens_keep_working_beside_portals(tmp_path: Path) -> None:
    store = SqliteTokenStore(tmp_path / "p.db")
    try:
        v = PortalVerifier(store, Deny(), StaticTokens(("webhook-token",)))
        webhook = portal_event("ONCRMCONTACTADD", member="any", token="webhook-token")
        assert await v.verify(webhook) == "token#1"  # its member_id is not what was proven
        with pytest.raises(UnauthorizedError):
            await v.verify(portal_event("ONCRMCONTACTADD", member="any", token="other"))
    finally:
        await store.close()


def test_domain_patterns_match_one_label() -> None:
    p = domain_pattern(("*.bitrix24.com", "crm.example.org"))
    assert p.match("acme.bitrix24.com") and p.match("crm.example.org")
    for bad in (
        "bitrix24.com",
        "a.b.bitrix24.com",
        "acme.bitrix24.com.evil.net",
        "acmebitrix24.com",
        "x.crm.example.org",
    ):
        assert not p.match(bad), bad


async def test_callback_confirms_a_real_install(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path]
) -> None:
    settings = verifier_settings(portal_certificate[0])
    async with PortalCallback(settings, resolver=StaticResolver()) as cb:
        await cb.confirm(
            portal_event(
                "ONAPPINSTALL", endpoint=fake_portal.endpoint("acme.portal.test"), access="good-7"
            )
        )
    assert fake_portal.calls == [
        {"host": f"acme.portal.test:{fake_portal.port}", "token": "good-7"}
    ]


@pytest.mark.parametrize(
    ("access", "endpoint", "domain", "words"),
    [
        ("wrong-app", None, "acme.portal.test", "another app"),
        ("expired", None, "acme.portal.test", "expired_token"),
        ("error", None, "acme.portal.test", "refused app.info"),
        ("slow", None, "acme.portal.test", "did not answer app.info within 1s"),
        ("redirect", None, "acme.portal.test", "redirect"),
        ("good-1", "http://acme.portal.test:{port}/rest/", "acme.portal.test", "must be https"),
        (
            "good-1",
            "https://other.portal.test:{port}/rest/",
            "acme.portal.test",
            "not on the portal's auth[domain]",
        ),
        ("good-1", None, "acme.evil.example", "not a portal domain we accept"),
        ("", None, "acme.portal.test", "without auth[access_token]"),
    ],
)
async def test_forged_installs_are_refused(
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    access: str,
    endpoint: str | None,
    domain: str,
    words: str,
) -> None:
    settings = verifier_settings(portal_certificate[0])
    url = (endpoint or "https://{domain}:{port}/rest/").format(domain=domain, port=fake_portal.port)
    async with PortalCallback(settings, resolver=StaticResolver()) as cb:
        with pytest.raises(UnauthorizedError, match=words.replace("[", r"\[").replace("]", r"\]")):
            await cb.confirm(
                portal_event("ONAPPINSTALL", domain=domain, endpoint=url, access=access)
            )


async def test_a_portal_on_a_private_address_is_refused(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path]
) -> None:
    settings = verifier_settings(portal_certificate[0], portal_allow_private=False)
    async with PortalCallback(settings, resolver=StaticResolver()) as cb:
        with pytest.raises(UnauthorizedError, match="private address"):
            await cb.confirm(
                portal_event("ONAPPINSTALL", endpoint=fake_portal.endpoint("acme.portal.test"))
            )
    assert fake_portal.calls == []  # never connected


async def test_an_answer_in_several_pieces_is_read_whole(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path]
) -> None:
    settings = verifier_settings(portal_certificate[0])
    async with PortalCallback(settings, resolver=StaticResolver()) as cb:
        await cb.confirm(portal_event("ONAPPINSTALL", access="split-1"))
