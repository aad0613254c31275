"""Verification against per-portal tokens (b24queue.auth.store), the trust model of a Bitrix24 app.

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
- ONAPPPAYMENT carries no application token (Bitrix24 sends domain, member_id and endpoints
  only), so anyone knowing a member_id could forge a payment. It is accepted only for a known
  portal, from its own domain, once the portal itself confirms: `app.info` with the freshest access
  token the portal's verified events brought (kept in the store, 0600). With no such token still
  valid, or no call-back, it is refused with a 401 that says why.
Static tokens (B24QUEUE_APP_TOKENS, e.g. an outgoing webhook's) keep working beside it.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from b24queue.auth.store import Grant, PortalRecord, TokenStore
from b24queue.auth.tokens import StaticTokens
from b24queue.errors import StoreUnavailableError, UnauthorizedError
from b24queue.events.event import Event
from b24queue.limits import LogBudget
from b24queue.outbound.hosts import same_host, url_host

log = logging.getLogger(__name__)
T = TypeVar("T")

INSTALL = "ONAPPINSTALL"
UNINSTALL = "ONAPPUNINSTALL"
PAYMENT = "ONAPPPAYMENT"
# Keep a fresher access token once the stored one has less than this left (at most a write per
# portal per half hour, not one per event).
REFRESH_BEFORE_S = 30 * 60
# Longest an access token is believed to live, whatever an event says (Bitrix24's: one hour).
MAX_ACCESS_S = 2 * 3600
# A stored access token this close to expiry is not used to ask the portal.
EXPIRY_MARGIN_S = 60


class InstallCheck(Protocol):
    async def confirm(self, event: Event) -> None:
        """Return if the portal confirms this install is ours; raise `UnauthorizedError`."""

    async def confirm_app(self, domain: str, access_token: str) -> dict[str, Any]:
        """The portal's `app.info` result, if the portal at `domain` answers for our app with
        this token; raise `UnauthorizedError` otherwise."""


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
        self._log_budget = LogBudget(5, 0.1, time.monotonic)

    async def _get(self, member_id: str) -> PortalRecord | None:
        return await self._store_call(self.store.get, member_id)

    async def _store_call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        try:
            return await fn(*args, **kw)
        except Exception as exc:
            # The detail (addresses, the driver's words) is for the log, not for the caller.
            if self._log_budget.spend() is not None:
                log.error("portal token store: %r", exc)
            raise StoreUnavailableError("the portal token store is unavailable") from exc

    async def verify(self, event: Event) -> str:
        """The tenant is the portal's member_id, once the event is proven to come from it (or
        `token#N` for an event let in by a static token)."""
        if self._static is not None and (static := self._static.tenant(event)) is not None:
            return static
        token, member_id = event.auth.application_token, event.auth.member_id
        if not token and event.name == PAYMENT:
            return await self._payment(event)
        if not token:
            raise UnauthorizedError("auth[application_token] is missing")
        if not member_id:
            raise UnauthorizedError("auth[member_id] is missing")
        record = await self._get(member_id)
        if event.name == INSTALL:
            await self._install(event, token, member_id, record)
            return member_id
        if record is None:
            raise UnauthorizedError(
                f"unknown portal: no ONAPPINSTALL was accepted for member_id {member_id}"
            )
        if not _same(record.token, token):
            raise UnauthorizedError("auth[application_token] does not match this portal's token")
        _check_same_portal(event, record)
        await self._keep_fresh_access(event, record)
        return member_id

    async def _keep_fresh_access(self, event: Event, record: PortalRecord) -> None:
        if record.access_expires > time.time() + REFRESH_BEFORE_S:
            return
        fresh = access_of(event)
        if fresh is not None and fresh.access_expires > record.access_expires:
            try:
                # The event's refresh token too: every OAuth event brings a new pair, so a
                # portal whose stored refresh token was lost (spent by a refresh whose answer
                # never arrived) can be called back again after its next event.
                await self.store.refresh_access(record.member_id, record.token, fresh)
            except Exception as exc:  # best effort: the event itself is verified
                if self._log_budget.spend() is not None:
                    log.warning("could not keep the portal's fresher access token: %r", exc)

    async def _payment(self, event: Event) -> str:
        member_id = event.auth.member_id
        if not member_id:
            raise UnauthorizedError("ONAPPPAYMENT without auth[member_id]")
        record = await self._get(member_id)
        if record is None:
            raise UnauthorizedError(
                f"ONAPPPAYMENT for unknown portal {member_id}: no ONAPPINSTALL was accepted for it"
            )
        _check_same_portal(event, record)
        if self._check is None:
            raise UnauthorizedError(
                "ONAPPPAYMENT carries no application token: it is accepted only when the portal "
                "confirms it, and the install call-back is off (B24QUEUE_PORTAL_CALLBACK)"
            )
        if not record.access_token or record.access_expires < time.time() + EXPIRY_MARGIN_S:
            raise UnauthorizedError(
                "ONAPPPAYMENT carries no application token and this portal's last access token "
                "has expired, so the portal cannot be asked to confirm it (access tokens come "
                "with the portal's events and last an hour)"
            )
        state = await self._check.confirm_app(record.domain, record.access_token)
        _check_payment_state(event, state)
        log.info(
            "ONAPPPAYMENT from %s (member_id %s) confirmed by the portal", record.domain, member_id
        )
        return member_id

    async def _install(
        self, event: Event, token: str, member_id: str, record: PortalRecord | None
    ) -> None:
        domain = event.auth.domain or ""
        if record is not None and _same(record.token, token):
            # The same install again (Bitrix24 retrying, or a replay): nothing changes, but it
            # speaks for its own portal only, as any other event.
            _check_same_portal(event, record)
            return
        if record is not None and not same_host(record.domain, domain):
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
        grant = access_of(event) or Grant("", 0)
        endpoint = event.auth.client_endpoint or ""
        record_new = PortalRecord(
            member_id=member_id,
            domain=domain,
            token=token,
            access_token=grant.access_token,
            access_expires=grant.access_expires,
            # What calling the portal back needs (b24queue.portal); an endpoint off the portal's
            # domain is not kept (the client builds https://<domain>/rest/ instead).
            refresh_token=event.auth.refresh_token or "",
            client_endpoint=endpoint if _on_domain(endpoint, domain) else "",
        )
        stored = await self._store_call(
            self.store.remember,
            record_new,
            replacing=None if record is None else record.token,
        )
        if not stored:
            now = await self._get(member_id)
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
    """The event speaks for the portal whose token it carries, and no other (host names compared
    in their IDNA form: a portal may spell its name either way)."""
    domain = event.auth.domain or ""
    if not same_host(domain, record.domain):
        raise UnauthorizedError("auth[domain] is not the domain this portal installed the app on")
    endpoint = event.auth.client_endpoint
    if endpoint:
        host = url_host(endpoint)
        if host is None or not same_host(host.removesuffix(":443"), domain.removesuffix(":443")):
            raise UnauthorizedError("auth[client_endpoint] is not on this portal's domain")


def _on_domain(endpoint: str, domain: str) -> bool:
    host = url_host(endpoint) if endpoint.startswith("https://") else None
    return host is not None and same_host(host.removesuffix(":443"), domain.removesuffix(":443"))


def access_of(event: Event) -> Grant | None:
    """The event's access token, when it expires (unix seconds) and the refresh token that came
    with it, if it carries an access token and its expiry."""
    auth = event.auth
    if not auth.access_token:
        return None
    # Unix seconds and an hour's seconds are a few digits; anything longer is not a time.
    now = int(time.time())
    if auth.expires and auth.expires.isdigit() and len(auth.expires) <= 12:
        expires = int(auth.expires)
    elif auth.expires_in and auth.expires_in.isdigit() and len(auth.expires_in) <= 8:
        expires = now + int(auth.expires_in)
    else:
        return None
    # Bitrix24's tokens last an hour: a claim of more must not keep a fresher token out.
    return Grant(auth.access_token, min(expires, now + MAX_ACCESS_S), auth.refresh_token or "")


# What ONAPPPAYMENT says and app.info must say too. DAYS counts down: a day apart is the same.
_PAYMENT_FIELDS = ("CODE", "STATUS", "PAYMENT_EXPIRED")


def _check_payment_state(event: Event, state: dict[str, Any]) -> None:
    """The event itself is unsigned: its payment state must be what the portal says now, or a
    caller could publish any state (a paid, never-expiring licence) for a known portal."""
    data = event.data if isinstance(event.data, dict) else {}
    for key in _PAYMENT_FIELDS:
        if key in data and str(data[key]) != str(state.get(key)):
            raise UnauthorizedError(
                f"ONAPPPAYMENT data[{key}] is not what the portal's app.info says"
            )
    days = data.get("DAYS")
    if days is not None and not _close_days(days, state.get("DAYS")):
        raise UnauthorizedError("ONAPPPAYMENT data[DAYS] is not what the portal's app.info says")


def _close_days(sent: Any, now: Any) -> bool:
    try:
        return abs(int(str(sent)[:12]) - int(str(now)[:12])) <= 1
    except ValueError:
        return False
