"""The install call-back against abuse (issue 11, finding 6): anyone can post an ONAPPINSTALL, so
the endpoint is pinned down (https, port 443, `/rest/`, the portal's own host, never an address),
the connect-time guard sees through IPv4 wrapped in IPv6, call-backs are bounded and rate-limited
(refused at once, never queued) and every refusal tells the caller the same thing.

The fake portal is published on 443 and listens elsewhere; `StaticResolver` maps the one onto the
other (see tests/support/fake_portal.py)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from b24queue.auth.install import (
    NOT_CONFIRMED,
    PortalCallback,
    PortalNotConfirmed,
    domain_pattern,
)
from b24queue.errors import UnauthorizedError
from b24queue.events import Event
from b24queue.limits import KeyedLimiter
from b24queue.outbound.hosts import is_public_address, normalise_host
from tests.support.clock import Clock
from tests.support.fake_portal import FakePortal, StaticResolver
from tests.support.portal_setup import portal_event, verifier_settings
from tests.support.proxy import free_port

PUNY = "xn--e1afmkfd"  # "пример"


def install(
    *, domain: str = "acme.portal.test", endpoint: str | None = None, access: str = "good-1"
) -> Event:
    return portal_event("ONAPPINSTALL", domain=domain, endpoint=endpoint, access=access)


async def refused(cb: PortalCallback, event: Event) -> PortalNotConfirmed:
    with pytest.raises(PortalNotConfirmed) as info:
        await cb.confirm(event)
    return info.value


# -- the endpoint -------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["8443", "0", "", "0443", "443:443", "65536", "x"])
async def test_a_port_other_than_443_is_refused(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], port: str
) -> None:
    async with PortalCallback(
        verifier_settings(portal_certificate[0]), resolver=StaticResolver()
    ) as cb:
        exc = await refused(cb, install(endpoint=f"https://acme.portal.test:{port}/rest/"))
    assert "port other than 443" in exc.detail
    assert fake_portal.calls == []


@pytest.mark.parametrize("port", ["8443", "0"])
async def test_a_domain_naming_another_port_is_refused(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], port: str
) -> None:
    # auth[domain] may carry a port (self-hosted portals): the call-back still only uses 443.
    domain = f"acme.portal.test:{port}"
    async with PortalCallback(
        verifier_settings(portal_certificate[0]), resolver=StaticResolver()
    ) as cb:
        exc = await refused(cb, install(domain=domain, endpoint=f"https://{domain}/rest/"))
    assert "auth[domain] has a port other than 443" in exc.detail
    assert fake_portal.calls == []


@pytest.mark.parametrize(
    ("domain", "endpoint"),
    [
        ("acme.portal.test", "https://acme.portal.test/rest/"),
        ("acme.portal.test", "https://acme.portal.test:443/rest"),
        ("acme.portal.test:443", "https://acme.portal.test:443/rest/"),
    ],
)
async def test_port_443_spelt_or_not_and_rest_with_or_without_slash_are_accepted(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], domain: str, endpoint: str
) -> None:
    resolver = StaticResolver()
    event = install(domain=domain, endpoint=endpoint, access="good-3")
    async with PortalCallback(verifier_settings(portal_certificate[0]), resolver=resolver) as cb:
        assert cb.endpoint(event) == "https://acme.portal.test/rest/app.info"
        await cb.confirm(event)
    assert resolver.asked == [("acme.portal.test", 443)]
    assert fake_portal.calls == [{"host": "acme.portal.test:443", "token": "good-3"}]


@pytest.mark.parametrize(
    "path", ["", "/", "/rest/x/", "/other/", "/REST/", "/rest//", "/rest/../", "/rest%2F"]
)
async def test_a_path_other_than_rest_is_refused(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], path: str
) -> None:
    async with PortalCallback(
        verifier_settings(portal_certificate[0]), resolver=StaticResolver()
    ) as cb:
        exc = await refused(cb, install(endpoint=f"https://acme.portal.test{path}"))
    assert "path is not /rest/" in exc.detail
    assert fake_portal.calls == []


@pytest.mark.parametrize(
    ("domain", "endpoint"),
    [
        ("127.0.0.1", "https://127.0.0.1/rest/"),
        ("2130706433", "https://2130706433/rest/"),
        ("acme.portal.test", "https://127.0.0.1/rest/"),
        ("acme.portal.test", "https://127.1/rest/"),
        ("acme.portal.test", "https://0x7f000001/rest/"),
        ("acme.portal.test", "https://[::1]/rest/"),
        ("acme.portal.test", "https://[::ffff:127.0.0.1]:443/rest/"),
    ],
)
async def test_ip_literal_hosts_are_refused(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], domain: str, endpoint: str
) -> None:
    # The addresses are even listed as portal domains: the rule, not the pattern, refuses them.
    settings = verifier_settings(
        portal_certificate[0], portal_domains="*.portal.test,127.0.0.1,2130706433"
    )
    resolver = StaticResolver()
    async with PortalCallback(settings, resolver=resolver) as cb:
        exc = await refused(cb, install(domain=domain, endpoint=endpoint))
    assert "IP address" in exc.detail
    assert resolver.asked == [] and fake_portal.calls == []


# -- the connect-time guard ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1 (Python calls it global)
        "2002:7f00:1::",  # 6to4 of 127.0.0.1 (Python calls it global)
        "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254, the cloud metadata address
        "::7f00:1",  # IPv4-compatible (deprecated; Python calls it global)
        "64:ff9b:1::a00:1",  # local-use NAT64 (RFC 8215)
    ],
)
async def test_the_guard_judges_ipv4_wrapped_in_ipv6_by_that_ipv4(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], address: str
) -> None:
    settings = verifier_settings(portal_certificate[0], portal_allow_private=False)
    async with PortalCallback(settings, resolver=StaticResolver(address)) as cb:
        exc = await refused(cb, install())
    assert "private address" in exc.detail
    assert fake_portal.calls == []  # never connected


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True),
        ("2002:808:808::", True),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::a9fe:a9fe", False),
        ("2002:c0a8:101::", False),
        ("::1", False),
        ("fe80::1", False),
        ("100.64.0.1", False),
        ("224.0.0.1", False),
        ("not-an-address", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public


# -- IDNA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "endpoint"),
    [
        ("ПРИМЕР.portal.test", f"https://{PUNY}.portal.test/rest/"),
        (f"{PUNY}.portal.test", "https://ПРИМЕР.portal.test/rest/"),
        ("пример.PORTAL.test", "https://Пример.portal.test:443/rest"),
    ],
)
async def test_unicode_and_punycode_spellings_of_one_host_are_one_host(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path], domain: str, endpoint: str
) -> None:
    resolver = StaticResolver()
    async with PortalCallback(verifier_settings(portal_certificate[0]), resolver=resolver) as cb:
        await cb.confirm(install(domain=domain, endpoint=endpoint, access="good-idna"))
    assert resolver.asked == [(f"{PUNY}.portal.test", 443)]
    assert fake_portal.calls == [{"host": f"{PUNY}.portal.test:443", "token": "good-idna"}]


@pytest.mark.parametrize(
    ("domain", "endpoint", "words"),
    [
        ("пример.portal.test", "https://primer.portal.test/rest/", "not on the portal's"),
        ("xn--zz.portal.test", "https://xn--zz.portal.test/rest/", "not a domain name"),
        ("acme.portal.test", "https://acme..portal.test/rest/", "not a domain name"),
        ("acme.portal.test", f"https://{'a' * 64}.portal.test/rest/", "not a domain name"),
        ("acme.portal.test", "https://[::1/rest/", "not a URL"),
        ("пример.evil.example", f"https://{PUNY}.evil.example/rest/", "not a portal domain"),
    ],
)
async def test_hosts_that_do_not_normalise_or_differ_are_refused(
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    domain: str,
    endpoint: str,
    words: str,
) -> None:
    async with PortalCallback(
        verifier_settings(portal_certificate[0]), resolver=StaticResolver()
    ) as cb:
        exc = await refused(cb, install(domain=domain, endpoint=endpoint))
    assert words in exc.detail
    assert fake_portal.calls == []


def test_idna_normalisation_and_unicode_patterns() -> None:
    assert normalise_host("ПРИМЕР.bitrix24.ru") == f"{PUNY}.bitrix24.ru"
    assert normalise_host(f"{PUNY.upper()}.Bitrix24.RU") == f"{PUNY}.bitrix24.ru"
    assert normalise_host("xn--zz.bitrix24.ru") is None
    assert normalise_host("") is None
    pattern = domain_pattern(("*.пример.рф",))
    assert pattern.match(f"acme.{PUNY}.xn--p1ai")
    assert not pattern.match("acme.пример.рф")  # hosts are normalised before matching


# -- bounded, rate-limited, fail fast -----------------------------------------------------------


async def test_a_flood_is_refused_at_once_instead_of_delaying_a_real_install(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path]
) -> None:
    settings = verifier_settings(
        portal_certificate[0], portal_check_concurrency=2, portal_check_timeout_s=10.0
    )
    async with PortalCallback(settings, resolver=StaticResolver()) as cb:
        flood = [
            asyncio.create_task(cb.confirm(install(domain=f"f{i}.portal.test", access=f"hold-{i}")))
            for i in range(2)
        ]
        await fake_portal.wait_for_calls(2)  # both slots taken, both held by the portal
        exc = await refused(cb, install(access="good-real"))
        # Refused while both held call-backs were still waiting: it did not queue behind them.
        assert not any(task.done() for task in flood)
        assert "already in flight" in exc.detail
        assert len(fake_portal.calls) == 2
        fake_portal.release.set()
        await asyncio.gather(*flood)
        await cb.confirm(install(access="good-after"))  # slots free again
    assert sorted(c["token"] for c in fake_portal.calls) == ["good-after", "hold-0", "hold-1"]


async def test_call_backs_are_rate_limited_per_domain(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path]
) -> None:
    clock = Clock()
    settings = verifier_settings(portal_certificate[0], portal_check_per_domain_per_min=2)
    async with PortalCallback(settings, resolver=StaticResolver(), clock=clock) as cb:
        await cb.confirm(install(access="good-1"))
        await cb.confirm(install(access="good-2"))
        exc = await refused(cb, install(access="good-3"))
        assert "for this domain" in exc.detail
        # Another spelling of the same host is the same domain.
        exc = await refused(cb, install(domain="ACME.portal.test", access="good-3"))
        assert "for this domain" in exc.detail
        await cb.confirm(install(domain="other.portal.test", access="good-4"))
        clock.now += 30  # 2 a minute: one more after 30 s
        await cb.confirm(install(access="good-5"))
        await refused(cb, install(access="good-6"))
    assert [c["token"] for c in fake_portal.calls] == ["good-1", "good-2", "good-4", "good-5"]


async def test_call_backs_are_rate_limited_overall(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path]
) -> None:
    clock = Clock()
    settings = verifier_settings(portal_certificate[0], portal_check_per_s=2.0)
    async with PortalCallback(settings, resolver=StaticResolver(), clock=clock) as cb:
        await cb.confirm(install(domain="a.portal.test"))
        await cb.confirm(install(domain="b.portal.test"))
        exc = await refused(cb, install(domain="c.portal.test"))
        assert "a second" in exc.detail
        clock.now += 0.5
        await cb.confirm(install(domain="c.portal.test"))
    assert len(fake_portal.calls) == 3


def test_the_per_domain_table_is_bounded_and_forgets_the_least_recent() -> None:
    clock = Clock()
    limiter = KeyedLimiter(capacity=1, per_s=1 / 60, max_keys=3, clock=clock)
    assert limiter.take("a") and limiter.take("b") and limiter.take("c")
    assert not limiter.take("a")  # "a" is now the most recent; "b" the least
    for i in range(100):
        limiter.take(f"flood-{i}.example")
        assert len(limiter) <= 3
    assert limiter.take("a")  # forgotten under the flood: a fresh bucket


# -- what the caller sees, what the log sees ----------------------------------------------------


async def test_every_refusal_tells_the_caller_the_same_generic_sentence(
    fake_portal: FakePortal, portal_certificate: tuple[Path, Path]
) -> None:
    closed = free_port()
    settings = verifier_settings(portal_certificate[0])
    async with (
        PortalCallback(settings, resolver=StaticResolver(ports={443: closed})) as unreachable,
        PortalCallback(settings, resolver=StaticResolver()) as cb,
    ):
        cases = [
            (unreachable, install()),  # a port scan: connection refused
            (cb, install(endpoint="https://acme.portal.test:8443/rest/")),
            (cb, install(endpoint="https://acme.portal.test/other/")),
            (cb, install(access="expired")),
            (cb, install(access="slow")),
        ]
        details = []
        for check, event in cases:
            with pytest.raises(UnauthorizedError) as info:
                await check.confirm(event)
            text = str(info.value)
            assert text == NOT_CONFIRMED
            for leak in ("127.0.0.1", str(closed), "8443", "Errno", "Connect", "expired"):
                assert leak not in text
            assert isinstance(info.value, PortalNotConfirmed)
            details.append(info.value.detail)
    # The reason is kept for the log (and the exception's note), not lost.
    assert "cannot reach the portal" in details[0] and str(closed) in details[0]
    assert "expired_token" in details[3]


async def test_the_reason_is_logged_escaped_and_the_log_is_not_flooded(
    fake_portal: FakePortal,
    portal_certificate: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    caplog.set_level(logging.WARNING, logger="b24queue.auth.install")
    async with PortalCallback(
        verifier_settings(portal_certificate[0]), resolver=StaticResolver(), clock=clock
    ) as cb:
        await refused(cb, install(domain="пример.evil.example"))
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and lines[0].isascii() and "\\u043f" in lines[0]
        assert "not a portal domain" in lines[0]
        for _ in range(40):
            await refused(cb, install(endpoint="https://acme.portal.test:8443/rest/"))
        logged = len(caplog.records)
        assert logged < 41  # a burst, then nothing: a flood of refusals is not a flood of lines
        clock.now += 1
        await refused(cb, install(endpoint="https://acme.portal.test:8443/rest/"))
    last = caplog.records[-1].getMessage()
    assert len(caplog.records) == logged + 1
    assert f"({41 - logged} refusals before this one not logged)" in last
    assert "port other than 443" in last
