"""What the portal store keeps per portal (`PortalRecord`), and its JSON form (Redis); what an
OAuth answer or an event grants (`Grant`). Standard library only."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime


@dataclass(frozen=True, slots=True)
class PortalRecord:
    """A portal that installed the app. `access_token` (expiring at `access_expires`, unix
    seconds) is the freshest one known: from its verified events, or from a refresh through the
    OAuth server with `refresh_token` (single-use: each refresh replaces both). `client_endpoint`
    is the portal's REST endpoint as the install sent it. No token appears in repr()."""

    member_id: str
    domain: str
    token: str = field(repr=False)
    installed_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    access_token: str = field(default="", repr=False)
    access_expires: int = 0
    refresh_token: str = field(default="", repr=False)
    client_endpoint: str = ""

    def as_json(self) -> str:
        return json.dumps(
            {
                "member_id": self.member_id,
                "domain": self.domain,
                "token": self.token,
                "installed_at": self.installed_at,
                "access_token": self.access_token,
                "access_expires": self.access_expires,
                "refresh_token": self.refresh_token,
                "client_endpoint": self.client_endpoint,
            }
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """What an OAuth answer or an event's auth grants: an access token, when it expires (unix
    seconds), and the refresh token that came with it ('' if none). No token appears in repr()."""

    access_token: str = field(repr=False)
    access_expires: int
    refresh_token: str = field(default="", repr=False)


def decode_record(raw: bytes | str) -> PortalRecord:
    data = json.loads(raw)
    return PortalRecord(
        data["member_id"],
        data["domain"],
        data["token"],
        data["installed_at"],
        str(data.get("access_token") or ""),
        int(data.get("access_expires") or 0),
        str(data.get("refresh_token") or ""),
        str(data.get("client_endpoint") or ""),
    )
