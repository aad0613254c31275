"""Which credentials and endpoint a portal is called with: the install's endpoint only on the
portal's own domain, inbound webhooks by domain with their code never shown, and what an
accepted ONAPPINSTALL keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from b24queue.auth.portal import PortalVerifier
from b24queue.auth.record import PortalRecord
from b24queue.auth.store import SqliteTokenStore
from b24queue.consumer import EventConsumer
from b24queue.errors import ConfigError
from b24queue.events import Event
from b24queue.events.envelope import token_digest
from b24queue.portal.api import PortalError
from b24queue.portal.clients import PortalClients
from b24queue.portal.credentials import Webhooks, rest_endpoint
from b24queue.secrets.redaction import redact
from tests.support.fake_portal import FakePortal, StaticResolver
from tests.support.portal_setup import deal_event, portal_settings


@pytest.mark.parametrize(
    ("endpoint", "used"),
    [
        ("https://acme.portal.test/rest/", "https://acme.portal.test/rest/"),
        ("https://ACME.portal.test:443/rest", "https://ACME.portal.test:443/rest/"),
        ("https://evil.test/rest/", "https://acme.portal.test/rest/"),
        ("http://acme.portal.test/rest/", "https://acme.portal.test/rest/"),
        ("https://acme.portal.test@evil.test/rest/", "https://acme.portal.test/rest/"),
        ("https://acme.portal.test/rest/?x=1", "https://acme.portal.test/rest/"),
        ("https://acme.portal.test/other/", "https://acme.portal.test/rest/"),
        ("https://[::1/rest/", "https://acme.portal.test/rest/"),
        ("", "https://acme.portal.test/rest/"),
    ],
)
def test_the_endpoint_is_the_installs_only_on_the_portals_domain(endpoint: str, used: str) -> None:
    record = PortalRecord("m1", "acme.portal.test", "t", client_endpoint=endpoint)
    assert rest_endpoint(record) == used


def test_webhooks_by_domain_and_their_code_never_shown() -> None:
    hooks = Webhooks(
        "https://a.portal.test/rest/1/abcd1234/#tok-a, https://b.portal.test/rest/7/zz99zz99#tok-b"
    )
    found = hooks.for_domain("A.portal.test")
    assert found is not None
    a, digests = found
    assert a.url("crm.deal.get") == "https://a.portal.test/rest/1/abcd1234/crm.deal.get"
    assert digests == (token_digest("tok-a"),)
    assert "abcd1234" not in repr(a) and hooks.for_domain("c.portal.test") is None
    assert redact("https://a.portal.test/rest/1/abcd1234/x") == "https://a.portal.test/rest/1/***/x"
    for bad in (
        "http://a.test/rest/1/abcd1234/#t",
        "https://a.test/rest/x/abcd1234/#t",
        "https://u:p@a.test/rest/1/abcd1234/#t",
        "https://a.test/rest/1/abcd1234/",  # no application token to pair it with
        "https://a.test/rest/1/abcd1234/#",
        "https://a.test/rest/1/abcd1234/#t, https://a.test/rest/2/efgh5678/#u",  # two per host
    ):
        with pytest.raises(ConfigError) as caught:
            Webhooks(bad)
        assert "abcd1234" not in str(caught.value)


async def test_a_webhook_portal_is_called_through_its_webhook(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    fake_portal.rest.webhooks["abcd1234"] = "w1"
    settings = portal_settings(
        portal_certificate[0],
        f"sqlite:{tmp_path / 'p.db'}",
        portal_webhooks="https://w1.portal.test/rest/1/abcd1234/#app-token-w1",
    )
    async with PortalClients(settings, resolver=StaticResolver()) as clients:
        # An outgoing-webhook event: no OAuth record for its portal.
        portal = clients.for_event(deal_event("w1", 3))
        assert (await portal.call("crm.deal.get", {"id": 3}))["ID"] == "3"
        assert [d async for d in portal.list("crm.deal.list", max_items=60)][-1]["ID"] == "60"
    assert fake_portal.rest.used_tokens == []  # no OAuth token was sent


async def test_a_webhook_is_used_only_for_events_with_its_portals_token(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    fake_portal.rest.webhooks["abcd1234"] = "w1"
    settings = portal_settings(
        portal_certificate[0],
        f"sqlite:{tmp_path / 'p.db'}",
        portal_webhooks="https://w1.portal.test/rest/1/abcd1234/#app-token-w1",
    )
    async with PortalClients(settings, resolver=StaticResolver()) as clients:
        # Portal B's admin knows B's own token (accepted by the ingress too) and names w1's
        # domain: w1's webhook is not B's to use.
        forged = deal_event("w1", 3).payload
        forged["auth"]["application_token"] = "app-token-b"
        with pytest.raises(PortalError, match="WRONG_PORTAL"):
            await clients.for_event(Event.from_payload(forged)).call("crm.deal.get", {"id": 3})
        # An event that carries no token at all (no digest either): refused too.
        bare = deal_event("w1", 3).payload
        del bare["auth"]["application_token"]
        with pytest.raises(PortalError, match="NO_APP_TOKEN"):
            await clients.for_event(Event.from_payload(bare)).call("crm.deal.get", {"id": 3})
    assert fake_portal.rest.served == []


async def test_the_fake_takes_a_webhook_code_only_on_its_own_portal(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    # w1's code sent to w2's host: the fake answers as Bitrix24 would (the code is not w2's).
    fake_portal.rest.webhooks["abcd1234"] = "w1"
    settings = portal_settings(
        portal_certificate[0],
        f"sqlite:{tmp_path / 'p.db'}",
        portal_webhooks="https://w2.portal.test/rest/1/abcd1234/#app-token-w2",
    )
    async with PortalClients(settings, resolver=StaticResolver()) as clients:
        with pytest.raises(PortalError, match="INVALID_CREDENTIALS"):
            await clients.for_event(deal_event("w2", 3)).call("crm.deal.get", {"id": 3})
    assert fake_portal.rest.served == []


async def test_an_install_keeps_what_calling_back_needs(tmp_path: Path) -> None:
    store = SqliteTokenStore(tmp_path / "p.db")
    verifier = PortalVerifier(store, None)
    for member, endpoint in (
        ("m1", "https://m1.portal.test/rest/"),
        ("m2", "https://evil.test/rest/"),
    ):
        install = Event.from_payload(
            {
                "event": "ONAPPINSTALL",
                "auth": {
                    "domain": f"{member}.portal.test",
                    "member_id": member,
                    "application_token": "app-1",
                    "access_token": "acc-1",
                    "expires_in": "3600",
                    "refresh_token": "ref-1",
                    "client_endpoint": endpoint,
                },
            }
        )
        await verifier.verify(install)
    m1, m2 = await store.get("m1"), await store.get("m2")
    assert m1 is not None and m1.refresh_token == "ref-1" and m1.access_token == "acc-1"
    assert m1.client_endpoint == "https://m1.portal.test/rest/"
    assert m2 is not None and m2.client_endpoint == ""  # off its domain: not kept
    assert "ref-1" not in repr(m1) and "acc-1" not in repr(m1)
    await store.close()


def test_portal_outside_a_worker_says_so() -> None:
    class Lonely(EventConsumer):
        queue = "q"
        events = ("X",)

    with pytest.raises(ConfigError, match="no portal clients"):
        Lonely().portal(deal_event("m1", 1))


async def test_the_example_reads_the_deal_its_event_names(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    from b24queue.retry import Reject
    from examples.deals import DealSync
    from tests.support.portal_setup import install

    store = SqliteTokenStore(tmp_path / "p.db")
    await install(store, fake_portal.rest, "m1")
    settings = portal_settings(portal_certificate[0], f"sqlite:{tmp_path / 'p.db'}")
    async with PortalClients(settings, resolver=StaticResolver()) as clients:
        consumer = DealSync()
        consumer.portals = clients
        await consumer.handle(deal_event("m1", 42))
        await consumer.handle(deal_event("nobody", 43))  # not installed: logged, acked
        with pytest.raises(Reject, match="no longer exists"):
            await consumer.handle(deal_event("m1", 999))
    assert fake_portal.rest.deal_gets == ["42"]
    await store.close()


@pytest.mark.parametrize(
    "extra",
    [
        {"oauth_url": "https://10.0.0.1/oauth/token/"},
        {"oauth_url": "https://[::1]/oauth/token/"},
        {"portal_webhooks": "https://127.0.0.1/rest/1/abcd1234/#t"},
        {
            "portal_webhooks": "https://2130706433/rest/1/abcd1234/#t"
        },  # 127.0.0.1 as inet_aton has it
    ],
)
def test_address_literals_need_private_addresses_allowed(
    extra: dict[str, str], portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    # A name goes through the guarded resolver; an address is connected to as it is.
    spec = f"sqlite:{tmp_path / 'p.db'}"
    refused = portal_settings(portal_certificate[0], spec, portal_allow_private=False, **extra)
    with pytest.raises(ConfigError, match="IP address"):
        PortalClients(refused)
    PortalClients(portal_settings(portal_certificate[0], spec, portal_allow_private=True, **extra))


async def test_an_installed_portal_at_an_address_literal_is_not_called(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    store = SqliteTokenStore(tmp_path / "p.db")
    access, refresh, expires = fake_portal.rest.issue("m9")
    record = PortalRecord(
        "m9", "127.0.0.1", "app-token-m9",
        access_token=access, access_expires=expires, refresh_token=refresh,
    )  # fmt: skip
    assert await store.remember(record)
    settings = portal_settings(
        portal_certificate[0], f"sqlite:{tmp_path / 'p.db'}", portal_allow_private=False
    )
    async with PortalClients(settings, resolver=StaticResolver()) as clients:
        with pytest.raises(PortalError, match="IP address"):
            await clients.for_event(deal_event("m9", 1, domain="127.0.0.1")).call("crm.deal.get")
    await store.close()
