"""Which credentials an event's portal is called with, and where.

Two kinds. OAuth (an app on many portals): the event's member_id selects the portal's record in
the store, and only that portal's tokens are ever used for it; the REST endpoint is the one the
install sent if it is https, on the portal's stored domain, at /rest/, else https://<domain>/rest/.
An inbound webhook (B24QUEUE_PORTAL_WEBHOOKS, https://<portal>/rest/<user>/<code>/#<app token>):
for events of a portal with no OAuth record, chosen by the event's domain, and only for an event
that came with the application token paired with it (the ingress lets in any event carrying any
configured token, whatever domain it names). The code in a webhook URL is a password: it is
never shown (b24queue.secrets.redaction hides it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from b24queue.auth.record import PortalRecord
from b24queue.errors import ConfigError
from b24queue.events.envelope import token_digest
from b24queue.outbound.hosts import normalise_host, same_host
from b24queue.secrets.redaction import WEBHOOK_PATH

# The application token paired with a webhook, after its '#': printable, no ',' '#' or space.
_APP_TOKEN = re.compile(r"[\x21-\x22\x24-\x2b\x2d-\x7e]{1,256}")
# Method names go into the URL's path: letters, digits, dots and underscores only.
METHOD = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,127}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one portal's calls go. `key` names its bucket (and its refresh lease)."""

    kind: str  # "oauth" or "webhook"
    key: str
    domain: str
    base_url: str = field(repr=False)  # ends in '/'; a webhook's holds its code

    def url(self, method: str) -> str:
        return self.base_url + method


def oauth_endpoint(record: PortalRecord) -> Endpoint:
    return Endpoint("oauth", record.member_id, record.domain, rest_endpoint(record))


def rest_endpoint(record: PortalRecord) -> str:
    domain = record.domain
    try:
        parts = urlsplit(record.client_endpoint)
        host = parts.netloc
    except ValueError:
        parts, host = None, ""
    if (
        parts is not None
        and parts.scheme == "https"
        and "@" not in host
        and not parts.query
        and not parts.fragment
        and parts.path in ("/rest/", "/rest")
        and same_host(host.removesuffix(":443"), domain.removesuffix(":443"))
    ):
        return f"https://{host}/rest/"
    return f"https://{domain}/rest/"


class Webhooks:
    """Inbound webhook URLs by their portal's host (IDNA form), each with the digests of the
    application tokens its events must have come with (the same URL may be given again with
    another token: the portal's events may come through several outgoing webhooks)."""

    def __init__(self, spec: str) -> None:
        self._by_host: dict[str, tuple[Endpoint, tuple[str, ...]]] = {}
        self.hostnames: set[str] = set()  # as in the URLs, without ports or brackets
        for i, entry in enumerate(u.strip() for u in spec.split(",") if u.strip()):
            target, digest = _parse_webhook(entry, i + 1)
            self.hostnames.add(host_of(target.base_url))
            known = self._by_host.get(target.domain)
            if known is not None and known[0] != target:
                raise ConfigError(
                    f"B24QUEUE_PORTAL_WEBHOOKS: webhook #{i + 1} names {target.domain} again "
                    "with another URL (one webhook per portal)"
                )
            self._by_host[target.domain] = (target, (*(known[1] if known else ()), digest))

    def __len__(self) -> int:
        return len(self._by_host)

    def for_domain(self, domain: str | None) -> tuple[Endpoint, tuple[str, ...]] | None:
        """The portal's webhook and the digests of the tokens paired with it."""
        host = normalise_host(domain or "")
        return self._by_host.get(host) if host else None


def _parse_webhook(entry: str, position: int) -> tuple[Endpoint, str]:
    bad = ConfigError(
        f"B24QUEUE_PORTAL_WEBHOOKS: webhook #{position} must look like "
        "https://<portal>/rest/<user id>/<code>/#<the portal's application token> "
        "(the code and the token are not shown here)"
    )
    url, _, app_token = entry.partition("#")
    if not _APP_TOKEN.fullmatch(app_token):
        raise bad
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise bad from None
    match = WEBHOOK_PATH.fullmatch(parts.path)
    host = normalise_host(parts.hostname or "")
    if parts.scheme != "https" or not match or not host or parts.query or "@" in parts.netloc:
        raise bad
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    where = f"{host}:{port}" if port not in (None, 443) else host
    base = f"https://{where}/rest/{match.group(1)}/{match.group(2)}/"
    return Endpoint("webhook", f"webhook:{where}", where, base), token_digest(app_token)


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""
