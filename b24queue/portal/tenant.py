"""Which credentials an event's portal is called with, chosen per event: the OAuth record its
member_id selects, if the event came with that portal's own application token and names its
domain, or else the webhook of its domain, if the event came with a token paired with it."""

from __future__ import annotations

import hmac

from b24queue.auth.record import PortalRecord
from b24queue.auth.store import TokenStore
from b24queue.events.envelope import token_digest
from b24queue.events.event import Event, token_digest_of
from b24queue.outbound.hosts import is_ip_literal, same_host
from b24queue.portal.api import NoCredentials, PortalError
from b24queue.portal.credentials import Endpoint, Webhooks, host_of, oauth_endpoint
from b24queue.portal.oauth import Refresher


async def credentials(
    store: TokenStore,
    refresher: Refresher,
    webhooks: Webhooks,
    event: Event,
    *,
    allow_private: bool,
) -> tuple[Endpoint, str, PortalRecord | None]:
    """Where the event's portal is called and with which access token (empty for a webhook),
    and the install that was chosen from (None for a webhook). The event's portal only: its
    member_id selects the record; its domain must agree."""
    member_id = event.auth.member_id
    record = await store.get(member_id) if member_id else None
    if record is None:
        return _webhook(webhooks, event), "", None
    if event.auth.domain and not same_host(event.auth.domain, record.domain):
        raise NoCredentials("WRONG_PORTAL", "the event's domain is not its portal's")
    # The ingress also lets in events carrying a static token (B24QUEUE_APP_TOKENS: an outgoing
    # webhook's), whatever member_id they name: only an event that came with the portal's own
    # application token may act with that portal's credentials.
    given = came_with(event)
    if given is None or not hmac.compare_digest(given, token_digest(record.token)):
        raise NoCredentials(
            "WRONG_PORTAL", "the event does not carry its portal's application token"
        )
    target = oauth_endpoint(record)
    if not allow_private and is_ip_literal(host_of(target.base_url)):
        # An address is connected to as it is, past the resolver that refuses private ones.
        raise PortalError("UNREACHABLE", "the portal's domain is an IP address")
    return target, await _token(refresher, record), record


def _webhook(webhooks: Webhooks, event: Event) -> Endpoint:
    """The webhook of the event's domain, if the event came with a token paired with it: the
    ingress lets in an event carrying any configured token whatever domain it names, so the
    domain alone would give portal B's admin (who knows B's token) portal A's webhook."""
    found = webhooks.for_domain(event.auth.domain)
    if found is None:
        raise NoCredentials("NO_CREDENTIALS", "no installed portal or webhook for this event")
    webhook, digests = found
    given = came_with(event)
    if given is None:
        raise NoCredentials("NO_APP_TOKEN", "the event carries no application token")
    matched = False
    for digest in digests:  # all of them, without stopping early
        matched |= hmac.compare_digest(given, digest)
    if not matched:
        raise NoCredentials("WRONG_PORTAL", "the event does not carry its webhook's app token")
    return webhook


async def _token(refresher: Refresher, record: PortalRecord) -> str:
    # Never the event's own: the message body leaves the OAuth pair out (events.envelope).
    if refresher.valid(record.access_expires):
        return record.access_token
    return (await refresher.fresh(record.member_id, record.access_token, record)).access_token


def came_with(event: Event) -> str | None:
    """The digest of the application token the event came with: from its message's header in a
    worker (the body leaves the token out), or of the token itself in an event built directly."""
    if event.auth.application_token:
        return token_digest(event.auth.application_token)
    return token_digest_of(event)
