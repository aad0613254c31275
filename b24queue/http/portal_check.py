"""Confirming an ONAPPINSTALL with the portal itself: `app.info` on the portal's REST endpoint
with the event's access token must answer for our app.

The endpoint comes from the (unverified) request, so it is treated as hostile: https only, its
host must be the event's `auth[domain]` and match the configured portal domains, it must not
resolve to a private, loopback or link-local address (checked when connecting, so DNS rebinding
cannot slip past), redirects are not followed, the answer is bounded in time and size.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from b24queue.errors import UnauthorizedError
from b24queue.events import Event
from b24queue.settings import Settings

MAX_ANSWER_BYTES = 64 * 1024


def domain_pattern(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """`*.bitrix24.com` matches exactly one label in place of `*` (never `a.b.bitrix24.com`,
    never `bitrix24.com.evil.net`)."""
    parts = []
    for p in patterns:
        escaped = re.escape(p.strip().lower()).replace(
            r"\*", "[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
        )
        parts.append(escaped)
    return re.compile(r"^(?:" + "|".join(parts) + r")$")


class _GuardedResolver(AbstractResolver):
    """Refuses to connect to private addresses, whatever the name resolves to at that moment."""

    def __init__(self, inner: AbstractResolver, allow_private: bool) -> None:
        self._inner = inner
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not self._allow_private:
            for r in results:
                ip = ipaddress.ip_address(r["host"])
                if not ip.is_global:
                    raise UnauthorizedError(f"portal host {host} resolves to a private address")
        return results

    async def close(self) -> None:
        await self._inner.close()


class PortalCallback:
    """An `InstallCheck` over HTTPS. Use as an async context manager (it owns a client session)."""

    def __init__(
        self,
        settings: Settings,
        *,
        resolver: AbstractResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._settings = settings
        self._domains = domain_pattern(settings.portal_domains)
        self._resolver = resolver
        self._ssl = ssl_context or ssl.create_default_context(
            cafile=settings.portal_ca_file or None
        )
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PortalCallback:
        resolver = _GuardedResolver(
            self._resolver or aiohttp.DefaultResolver(), self._settings.portal_allow_private
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=resolver, ssl=self._ssl, limit=20),
            timeout=aiohttp.ClientTimeout(total=self._settings.portal_check_timeout_s),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    def endpoint(self, event: Event) -> str:
        """The `app.info` URL, or `UnauthorizedError` saying which rule it broke."""
        domain = (event.auth.domain or "").lower()
        if not domain or not self._domains.match(domain):
            raise UnauthorizedError(
                f"auth[domain] {domain!r} is not a portal domain we accept "
                "(B24QUEUE_PORTAL_DOMAINS)"
            )
        raw = event.auth.client_endpoint or ""
        parts = urlsplit(raw)
        if parts.scheme != "https":
            raise UnauthorizedError("auth[client_endpoint] must be https://")
        if (parts.hostname or "").lower() != domain:
            raise UnauthorizedError("auth[client_endpoint] is not on the portal's auth[domain]")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise UnauthorizedError("auth[client_endpoint] is not a plain REST endpoint")
        base = raw if raw.endswith("/") else raw + "/"
        return base + "app.info"

    async def confirm(self, event: Event) -> None:
        assert self._session is not None, "use `async with PortalCallback(...)`"
        url = self.endpoint(event)
        if not event.auth.access_token:
            raise UnauthorizedError(
                "ONAPPINSTALL without auth[access_token]: cannot ask the portal"
            )
        answer = await self._ask(url, event.auth.access_token)
        result = answer.get("result")
        if not isinstance(result, dict):
            raise UnauthorizedError("the portal's app.info answer has no result")
        ours = self._settings.app_client_id
        codes = {str(result.get(k)) for k in ("CODE", "client_id", "CLIENT_ID") if result.get(k)}
        if ours not in codes:
            raise UnauthorizedError("the portal says this token belongs to another app")

    async def _ask(self, url: str, access_token: str) -> dict[str, Any]:
        assert self._session is not None
        try:
            async with self._session.post(
                url, data={"auth": access_token}, allow_redirects=False
            ) as resp:
                body = await resp.content.read(MAX_ANSWER_BYTES + 1)
                status = resp.status
        except UnauthorizedError:
            raise
        except TimeoutError:
            limit = self._settings.portal_check_timeout_s
            raise UnauthorizedError(
                f"the portal did not answer app.info within {limit:g}s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UnauthorizedError(
                f"cannot reach the portal to confirm the install: {exc!r}"
            ) from None
        if 300 <= status < 400:
            raise UnauthorizedError("the portal answered app.info with a redirect (not followed)")
        if len(body) > MAX_ANSWER_BYTES:
            raise UnauthorizedError("the portal's app.info answer is too large")
        try:
            answer = json.loads(body)
        except ValueError:
            raise UnauthorizedError(
                f"the portal's app.info answer (HTTP {status}) is not JSON"
            ) from None
        if not isinstance(answer, dict):
            raise UnauthorizedError("the portal's app.info answer is not an object")
        if status != 200 or "error" in answer:
            code = str(answer.get("error", status))[:64]
            raise UnauthorizedError(f"the portal refused app.info ({code})")
        return answer
