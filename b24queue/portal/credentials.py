"""Which credentials an event's portal is called with, and where.

Two kinds. OAuth (an app on many portals): the event's member_id selects the portal's record in
the store, and only that portal's tokens are ever used for it; the REST endpoint is the one the
install sent if it is https, on the portal's stored domain, at /rest/, else https://<domain>/rest/.
An inbound webhook (B24QUEUE_PORTAL_WEBHOOKS, https://<portal>/rest/<user>/<code>/): for events
of a portal with no OAuth record, chosen by the event's domain. The code in a webhook URL is a
password: it is never shown (`redact`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from b24queue.auth.record import PortalRecord
from b24queue.errors import ConfigError
from b24queue.hosts import normalise_host, same_host

_WEBHOOK_PATH = re.compile(r"/rest/([0-9]{1,12})/([A-Za-z0-9]{4,128})/?")
# Method names go into the URL's path: letters, digits, dots and underscores only.
METHOD = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,127}")


@dataclass(frozen=True, slots=True)
class Target:
    """Where one portal's calls go. `key` names its bucket (and its refresh lease)."""

    kind: str  # "oauth" or "webhook"
    key: str
    domain: str
    base_url: str = field(repr=False)  # ends in '/'; a webhook's holds its code

    def url(self, method: str) -> str:
        return self.base_url + method


def oauth_target(record: PortalRecord) -> Target:
    return Target("oauth", record.member_id, record.domain, rest_endpoint(record))


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
    """Inbound webhook URLs by their portal's host (IDNA form)."""

    def __init__(self, spec: str) -> None:
        self._by_host: dict[str, Target] = {}
        for i, url in enumerate(u.strip() for u in spec.split(",") if u.strip()):
            target = _parse_webhook(url, i + 1)
            self._by_host[target.domain] = target

    def __len__(self) -> int:
        return len(self._by_host)

    def for_domain(self, domain: str | None) -> Target | None:
        host = normalise_host(domain or "")
        return self._by_host.get(host) if host else None


def _parse_webhook(url: str, position: int) -> Target:
    bad = ConfigError(
        f"B24QUEUE_PORTAL_WEBHOOKS: webhook #{position} must look like "
        "https://<portal>/rest/<user id>/<code>/ (the code is not shown here)"
    )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise bad from None
    match = _WEBHOOK_PATH.fullmatch(parts.path)
    host = normalise_host(parts.hostname or "")
    if parts.scheme != "https" or not match or not host or parts.query or "@" in parts.netloc:
        raise bad
    where = f"{host}:{port}" if port not in (None, 443) else host
    base = f"https://{where}/rest/{match.group(1)}/{match.group(2)}/"
    return Target("webhook", f"webhook:{where}", where, base)


def redact(url: str) -> str:
    """A webhook URL with its code hidden (for logs and errors)."""
    return _WEBHOOK_PATH.sub(lambda m: f"/rest/{m.group(1)}/***/", url)
