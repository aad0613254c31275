"""Is this event really from our portal? The ingress asks a `TokenVerifier` and nothing else.

Bitrix24 signs nothing: the only proof is `auth[application_token]`, compared with a token we know.
Today that is a static list (an outgoing webhook's token, or one app's token); a per-portal store
(member_id -> token, learned at ONAPPINSTALL) plugs in by implementing the same protocol.
"""

from __future__ import annotations

import hmac
import logging
from typing import Protocol

from b24queue.errors import ConfigError, UnauthorizedError
from b24queue.events.event import Event
from b24queue.settings import Settings

log = logging.getLogger(__name__)


class TokenVerifier(Protocol):
    async def verify(self, event: Event) -> str:
        """If the event is authentic, the tenant it speaks for (the key of per-tenant limits,
        never a token); raise `UnauthorizedError` otherwise."""

    async def accepted(self, event: Event) -> None:
        """Called once the event is stored (e.g. to forget a portal after ONAPPUNINSTALL)."""


class StaticTokens:
    """Accept an event whose application token equals one of a fixed set."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        if not tokens or any(not t for t in tokens):
            raise ConfigError("StaticTokens needs at least one non-empty token")
        self._tokens = tuple(t.encode() for t in tokens)

    def tenant(self, event: Event) -> str | None:
        """`token#N` if the event carries the Nth configured token (the only thing a static
        token proves: its member_id and domain are whatever the caller wrote), else None."""
        given = event.auth.application_token
        if not given:
            return None
        candidate = given.encode()
        # Compare with every token, without stopping early, so timing says nothing about which
        # token (or how much of one) matched.
        matched = 0
        for number, token in enumerate(self._tokens, 1):
            if hmac.compare_digest(token, candidate) and not matched:
                matched = number
        return f"token#{matched}" if matched else None

    async def verify(self, event: Event) -> str:
        if not event.auth.application_token and event.name == "ONAPPPAYMENT":
            raise UnauthorizedError(
                "ONAPPPAYMENT carries no application token: it is accepted only when the portal "
                "confirms it, with per-portal verification (B24QUEUE_PORTAL_VERIFICATION)"
            )
        if not event.auth.application_token:
            raise UnauthorizedError("auth[application_token] is missing")
        tenant = self.tenant(event)
        if tenant is None:
            raise UnauthorizedError("auth[application_token] does not match a configured token")
        return tenant

    async def accepted(self, event: Event) -> None:
        return None


class AcceptAll:
    """No verification at all: only with B24QUEUE_ALLOW_UNVERIFIED=true, and said loudly."""

    async def verify(self, event: Event) -> str:
        # Nothing is proven: the tenant is whoever the event claims to be.
        auth = event.auth
        return auth.member_id or (f"domain:{auth.domain}" if auth.domain else "-")

    async def accepted(self, event: Event) -> None:
        return None


class _NoStaticTokens:
    async def verify(self, event: Event) -> str:
        raise UnauthorizedError("auth[application_token] does not match")

    async def accepted(self, event: Event) -> None:
        return None


def verifier_from_settings(settings: Settings) -> TokenVerifier:
    """The static part. Per-portal verification (B24QUEUE_PORTAL_VERIFICATION) is composed
    around it by the process that owns the token store."""
    if settings.app_tokens:
        return StaticTokens(settings.app_tokens)
    if settings.portal_verification:
        return _NoStaticTokens()
    if settings.allow_unverified:
        log.warning(
            "VERIFICATION IS OFF (B24QUEUE_ALLOW_UNVERIFIED=true): anyone who can reach this "
            "ingress can publish events. Set B24QUEUE_APP_TOKENS for anything but a local trial."
        )
        return AcceptAll()
    raise ConfigError(
        "no application token configured: set B24QUEUE_APP_TOKENS=<token>[,<token>...] "
        "(the portal's application or outgoing-webhook token), or "
        "B24QUEUE_PORTAL_VERIFICATION=true (an app on many portals), or explicitly "
        "B24QUEUE_ALLOW_UNVERIFIED=true to accept unverified events"
    )
