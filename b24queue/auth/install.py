"""Confirming an ONAPPINSTALL with the portal itself: `app.info` on the portal's REST endpoint
with the event's access token must answer for our app.

The endpoint comes from the (unverified) request, so it is treated as hostile: https on port 443,
path `/rest/`, its host (IDNA-normalised, never an IP literal) must be the event's `auth[domain]`
and match the configured portal domains, it must not resolve to a private, loopback or link-local
address, nor to one wrapped in IPv6 (checked when connecting, so DNS rebinding cannot slip past),
redirects are not followed, the answer is bounded in time, bytes and values (b24queue.outbound).

Anyone can post an ONAPPINSTALL and each one costs an outbound call, so call-backs are
rate-limited per domain and overall, and at most `portal_check_concurrency` run at once: past
that an install is refused at once, never queued, so a flood cannot make a real install wait out
the timeout. Every refusal tells the caller the same thing (no oracle for port scans); the reason
goes to the log, escaped, truncated and itself rate-limited.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver

from b24queue.errors import ConfigError, UnauthorizedError
from b24queue.events.event import Event
from b24queue.limits import KeyedLimiter, LogBudget, TokenBucket
from b24queue.outbound.answers import AnswerError, Bounds, Redirected, check_redirect, read_json
from b24queue.outbound.hosts import is_ip_literal, normalise_host
from b24queue.outbound.resolver import GuardedResolver
from b24queue.settings import Settings
from b24queue.telemetry.logs import client_text

log = logging.getLogger(__name__)

# app.info answers a few dozen values in a few hundred bytes. At most
# `portal_check_concurrency` answers are read at once: no budget of their own beyond that.
BOUNDS = Bounds(max_bytes=64 * 1024, max_values=10_000)
NOT_CONFIRMED = "the portal did not confirm this install"
MAX_TRACKED_DOMAINS = 4096  # per-domain buckets kept; the domains are chosen by the caller
REFUSALS_LOGGED_PER_S = 1.0  # sustained; a burst of 20 first (a flood must not flood the log)


class PortalNotConfirmed(UnauthorizedError):
    """A refused install call-back. `str()` is the same generic sentence for every reason (it is
    what the caller gets back); the reason, escaped and truncated, is `detail` (and a note)."""

    def __init__(self, detail: str) -> None:
        super().__init__(NOT_CONFIRMED)
        self.detail = client_text(detail, 300)
        self.add_note(self.detail)


def domain_pattern(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """`*.bitrix24.com` matches exactly one label in place of `*` (never `a.b.bitrix24.com`,
    never `bitrix24.com.evil.net`). Patterns are matched in their IDNA (punycode) form."""
    parts = []
    for p in patterns:
        try:
            ascii_pattern = p.strip().lower().encode("idna").decode("ascii")
        except UnicodeError:
            raise ConfigError(f"B24QUEUE_PORTAL_DOMAINS: {p!r} is not a domain name") from None
        escaped = re.escape(ascii_pattern).replace(r"\*", "[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
        parts.append(escaped)
    return re.compile(r"^(?:" + "|".join(parts) + r")$")


class PortalCallback:
    """An `InstallCheck` over HTTPS. Use as an async context manager (it owns a client session)."""

    def __init__(
        self,
        settings: Settings,
        *,
        resolver: AbstractResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._domains = domain_pattern(settings.portal_domains)
        self._resolver = resolver
        self._ssl = ssl_context or ssl.create_default_context(
            cafile=settings.portal_ca_file or None
        )
        self._session: aiohttp.ClientSession | None = None
        self._clock = clock
        per_domain = float(settings.portal_check_per_domain_per_min)
        self._per_domain = KeyedLimiter(per_domain, per_domain / 60, MAX_TRACKED_DOMAINS, clock)
        per_s = settings.portal_check_per_s
        self._overall = TokenBucket(max(1.0, per_s), per_s, clock())
        self._in_flight = 0
        self._log_budget = LogBudget(20, REFUSALS_LOGGED_PER_S, clock)

    async def __aenter__(self) -> PortalCallback:
        resolver = GuardedResolver(
            self._resolver,
            allow_private=self._settings.portal_allow_private,
            refuse=_private_address,
        )
        # The pool is as large as the number of call-backs we let run (never a queue to wait
        # in), and nothing is kept alive: each portal is called once per install.
        connector = aiohttp.TCPConnector(
            resolver=resolver,
            ssl=self._ssl,
            limit=self._settings.portal_check_concurrency,
            force_close=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._settings.portal_check_timeout_s),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    def endpoint(self, event: Event) -> str:
        """The `app.info` URL, or `PortalNotConfirmed` saying (in `detail`) which rule it broke."""
        return f"https://{self._target(event)}/rest/app.info"

    def _target(self, event: Event) -> str:
        """The portal's host, checked. The URL is built from it alone: nothing else of the
        request's `client_endpoint` reaches the call-back."""
        raw = event.auth.domain or ""
        domain = _host_of(raw, "auth[domain]")
        if not self._domains.match(domain):
            raise PortalNotConfirmed(
                f"auth[domain] '{raw[:100]}' is not a portal domain we accept "
                "(B24QUEUE_PORTAL_DOMAINS)"
            )
        raw_endpoint = event.auth.client_endpoint or ""
        try:
            parts = urlsplit(raw_endpoint)
        except ValueError:  # e.g. an unbalanced '[' in the host
            raise PortalNotConfirmed("auth[client_endpoint] is not a URL") from None
        if parts.scheme != "https":
            raise PortalNotConfirmed("auth[client_endpoint] must be https://")
        if "@" in parts.netloc or "?" in raw_endpoint or "#" in raw_endpoint:
            raise PortalNotConfirmed("auth[client_endpoint] is not a plain REST endpoint")
        if _host_of(parts.netloc, "auth[client_endpoint]") != domain:
            raise PortalNotConfirmed("auth[client_endpoint] is not on the portal's auth[domain]")
        if parts.path not in ("/rest/", "/rest"):
            raise PortalNotConfirmed("auth[client_endpoint] path is not /rest/")
        return domain

    async def confirm(self, event: Event) -> None:
        assert self._session is not None, "use `async with PortalCallback(...)`"
        try:
            await self._confirm(event)
        except PortalNotConfirmed as exc:
            self._log_refusal(event.auth.domain, exc.detail)
            raise

    async def _confirm(self, event: Event) -> None:
        domain = self._target(event)
        if not event.auth.access_token:
            raise PortalNotConfirmed(
                "ONAPPINSTALL without auth[access_token]: cannot ask the portal"
            )
        self._admit(domain)
        self._in_flight += 1
        try:
            answer = await self._ask(f"https://{domain}/rest/app.info", event.auth.access_token)
        finally:
            self._in_flight -= 1
        self._check_ours(answer)

    async def confirm_app(self, domain: str, access_token: str) -> dict[str, Any]:
        """Ask the portal at `domain` (a known portal's stored domain) whether this access token
        is our app's: for events that carry no application token (ONAPPPAYMENT)."""
        assert self._session is not None, "use `async with PortalCallback(...)`"
        try:
            host = _host_of(domain, "the portal's domain")
            if not self._domains.match(host):
                raise PortalNotConfirmed(f"domain '{domain[:100]}' is not one we accept")
            self._admit(host)
            self._in_flight += 1
            try:
                answer = await self._ask(f"https://{host}/rest/app.info", access_token)
            finally:
                self._in_flight -= 1
            return self._check_ours(answer)
        except PortalNotConfirmed as exc:
            self._log_refusal(domain, exc.detail)
            raise

    def _check_ours(self, answer: dict[str, Any]) -> dict[str, Any]:
        result = answer.get("result")
        if not isinstance(result, dict):
            raise PortalNotConfirmed("the portal's app.info answer has no result")
        ours = self._settings.app_client_id
        codes = {str(result.get(k)) for k in ("CODE", "client_id", "CLIENT_ID") if result.get(k)}
        if ours not in codes:
            raise PortalNotConfirmed("the portal says this token belongs to another app")
        return result

    def _admit(self, domain: str) -> None:
        """Fail fast, never wait: Bitrix24 sends an install once, and a flood must not make it
        wait out the timeout behind forged ones. Busy is checked first, so refusals for it spend
        no rate budget; the per-domain bucket before the overall one, so hammering one domain
        does not spend the budget of the others."""
        s = self._settings
        if self._in_flight >= s.portal_check_concurrency:
            raise PortalNotConfirmed(
                f"{self._in_flight} call-backs already in flight "
                "(B24QUEUE_PORTAL_CHECK_CONCURRENCY): refused at once, not queued"
            )
        if not self._per_domain.take(domain):
            raise PortalNotConfirmed(
                f"rate limited: more than {s.portal_check_per_domain_per_min} call-backs a minute "
                "for this domain (B24QUEUE_PORTAL_CHECK_PER_DOMAIN_PER_MIN)"
            )
        if not self._overall.take(self._clock()):
            raise PortalNotConfirmed(
                f"rate limited: more than {s.portal_check_per_s:g} call-backs a second "
                "(B24QUEUE_PORTAL_CHECK_PER_S)"
            )

    def _log_refusal(self, domain: str | None, detail: str) -> None:
        skipped = self._log_budget.spend()
        if skipped is None:
            return
        log.warning(
            "install call-back for %s refused: %s%s",
            client_text(domain),
            detail,
            f" ({skipped} refusals before this one not logged)" if skipped else "",
        )

    async def _ask(self, url: str, access_token: str) -> dict[str, Any]:
        assert self._session is not None
        status = 0
        try:
            async with self._session.post(
                url, data={"auth": access_token}, allow_redirects=False
            ) as resp:
                status = resp.status
                check_redirect(status, resp.headers.get("Location"))
                answer = await read_json(resp.content, BOUNDS)
        except PortalNotConfirmed:
            raise  # from the resolver guard
        except TimeoutError:
            limit = self._settings.portal_check_timeout_s
            raise PortalNotConfirmed(
                f"the portal did not answer app.info within {limit:g}s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            # For the log only (it names addresses and ports): the caller gets NOT_CONFIRMED.
            raise PortalNotConfirmed(
                f"cannot reach the portal: {type(exc).__name__}: {exc}"
            ) from None
        except Redirected as exc:
            raise PortalNotConfirmed(f"the portal's app.info {exc}") from None
        except AnswerError as exc:  # too large, or not JSON
            raise PortalNotConfirmed(f"app.info (HTTP {status}): {exc}") from None
        if not isinstance(answer, dict):
            raise PortalNotConfirmed("the portal's app.info answer is not an object")
        if status != 200 or "error" in answer:
            code = str(answer.get("error", status))[:64]
            raise PortalNotConfirmed(f"the portal refused app.info ({code})")
        return answer


def _private_address(host: str, address: str) -> PortalNotConfirmed:
    return PortalNotConfirmed(f"portal host {host} resolves to a private address ({address})")


def _host_of(hostport: str, field: str) -> str:
    """The normalised host of `hostport` (auth[domain], or the endpoint's host[:port]): never an
    address, and a port only if spelt `:443` (the call-back reaches nothing else)."""
    if hostport.startswith("["):
        raise PortalNotConfirmed(f"{field} is an IP address")
    host, colon, port = hostport.partition(":")
    if colon and port != "443":
        raise PortalNotConfirmed(f"{field} has a port other than 443")
    ascii_host = normalise_host(host)
    if ascii_host is None:
        raise PortalNotConfirmed(f"{field} host is not a domain name (IDNA)")
    if is_ip_literal(ascii_host):
        raise PortalNotConfirmed(f"{field} is an IP address")
    return ascii_host
