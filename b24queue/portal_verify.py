"""Verification against per-portal tokens (b24queue.portals), the trust model of a Bitrix24 app.

- ONAPPINSTALL from an unknown portal: the portal is asked to confirm (an `InstallCheck`: the
  ingress calls `app.info` on the portal with the event's access token), then the token is
  remembered, then the event is published.
- ONAPPINSTALL from a known portal: the same token is a repeat (accepted, nothing changes); a new
  token is a reinstall and must come from the same domain and pass the portal check: it is never
  replaced silently.
- Any other event: its token must equal the stored one for its member_id (constant time), and
  its `auth[domain]` (and the host of `auth[client_endpoint]`, when sent) must be the portal's
  stored domain: one tenant cannot speak for another portal. Unknown portals and mismatches are
  refused.
- ONAPPUNINSTALL: verified like any other event, published, then the portal is forgotten, but
  only when it came with that portal's own token (not a static one), and only if the stored token
  is still the one it came with.
- Writes are compare-and-set: two installs of one portal racing cannot overwrite each other.
Static tokens (B24QUEUE_APP_TOKENS, e.g. an outgoing webhook's) keep working beside it.
"""

from __future__ import annotations

import hmac
import logging
from typing import Protocol
from urllib.parse import urlsplit

from b24queue.errors import UnauthorizedError
from b24queue.events import Event
from b24queue.portals import PortalRecord, TokenStore
from b24queue.verify import StaticTokens

log = logging.getLogger(__name__)

INSTALL = "ONAPPINSTALL"
UNINSTALL = "ONAPPUNINSTALL"


class InstallCheck(Protocol):
    async def confirm(self, event: Event) -> None:
        """Return if the portal confirms this install is ours; raise `UnauthorizedError`."""


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class PortalVerifier:
    def __init__(
        self,
        store: TokenStore,
        check: InstallCheck | None,
        static: StaticTokens | None = None,
    ) -> None:
        self.store = store
        self._check = check
        self._static = static

    async def verify(self, event: Event) -> None:
        if self._static is not None and self._static.matches(event):
            return
        token, member_id = event.auth.application_token, event.auth.member_id
        if not token:
            raise UnauthorizedError("auth[application_token] is missing")
        if not member_id:
            raise UnauthorizedError("auth[member_id] is missing")
        record = await self.store.get(member_id)
        if event.name == INSTALL:
            await self._install(event, token, member_id, record)
            return
        if record is None:
            raise UnauthorizedError(
                f"unknown portal: no ONAPPINSTALL was accepted for member_id {member_id}"
            )
        if not _same(record.token, token):
            raise UnauthorizedError("auth[application_token] does not match this portal's token")
        _check_same_portal(event, record)

    async def _install(
        self, event: Event, token: str, member_id: str, record: PortalRecord | None
    ) -> None:
        domain = event.auth.domain or ""
        if record is not None and _same(record.token, token):
            return  # the same install again (Bitrix24 retrying, or a replay): nothing changes
        if record is not None and record.domain.lower() != domain.lower():
            # app.info confirms the app and the token's portal, but not the member_id: without
            # this, someone with the app on their own portal could claim another portal's id.
            raise UnauthorizedError(
                f"ONAPPINSTALL for known member_id {member_id} from another domain; if the portal "
                f"was renamed, run `b24queue portals forget {member_id}` and reinstall"
            )
        if self._check is None:
            if record is not None:
                raise UnauthorizedError(
                    "ONAPPINSTALL with a new token for a known portal: a reinstall is only "
                    "accepted when the portal confirms it (B24QUEUE_PORTAL_CALLBACK)"
                )
            log.warning("trusting first install of %s (member_id %s) unchecked", domain, member_id)
        else:
            await self._check.confirm(event)
        stored = await self.store.remember(
            PortalRecord(member_id=member_id, domain=domain, token=token),
            replacing=None if record is None else record.token,
        )
        if not stored:
            now = await self.store.get(member_id)
            if now is None or not _same(now.token, token):
                # Another install of this portal was stored meanwhile (a race, or a forgery
                # racing the real one): this one is not the portal's token now.
                raise UnauthorizedError(
                    f"ONAPPINSTALL for member_id {member_id} raced another install; not stored"
                )
            return
        log.info(
            "portal %s (member_id %s) %s",
            domain,
            member_id,
            "installed" if record is None else "reinstalled: new token confirmed by the portal",
        )

    async def accepted(self, event: Event) -> None:
        token, member_id = event.auth.application_token, event.auth.member_id
        if event.name != UNINSTALL or not member_id or not token:
            return
        # Only the portal's own token uninstalls it: an event let in by a static token (an
        # outgoing webhook's) must not make the store forget a portal. The delete is
        # conditional on that token, so it is also the check.
        if await self.store.forget(member_id, token=token):
            log.info(
                "portal %s (member_id %s) uninstalled: token forgotten",
                event.auth.domain,
                event.auth.member_id,
            )


def _check_same_portal(event: Event, record: PortalRecord) -> None:
    """The event speaks for the portal whose token it carries, and no other."""
    domain = (event.auth.domain or "").lower()
    if domain != record.domain.lower():
        raise UnauthorizedError("auth[domain] is not the domain this portal installed the app on")
    endpoint = event.auth.client_endpoint
    if endpoint and _host(endpoint) != domain.split(":", 1)[0]:
        raise UnauthorizedError("auth[client_endpoint] is not on this portal's domain")


def _host(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:  # e.g. an unbalanced '[' in the host
        return None
