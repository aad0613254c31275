"""Two portals for the per-portal tests, their events, and a call-back that trusts any install."""

from __future__ import annotations

from typing import Any

from b24queue.events import Event

ALPHA = {"domain": "alpha.bitrix24.com", "member_id": "a" * 32, "application_token": "alpha-tok"}
BETA = {"domain": "beta.bitrix24.com", "member_id": "b" * 32, "application_token": "beta-tok"}


def event(name: str, auth: dict[str, str], **more: str) -> dict[str, Any]:
    return {
        "event": name,
        "data": {"FIELDS": {"ID": "1"}},
        "auth": {**auth, "client_endpoint": f"https://{auth['domain']}/rest/", **more},
    }


class Trust:
    async def confirm(self, event: Event) -> None:
        return None
