"""`b24queue portals bind-offline MEMBER_ID EVENT...`: ask the portal to queue these events for
us (event.bind with event_type=offline and our auth_connector), and optionally to ping the ingress
with ONOFFLINEEVENT when records appear.

event.bind needs an administrator's token: the one stored at install is the installing user's
(an admin, since only admins install apps). Offline events need a plan that has them
(feature.get says); auth_connector needs Professional or above, per Bitrix24's documentation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from b24queue.auth.record import PortalRecord
from b24queue.auth.store import open_store
from b24queue.errors import ConfigError
from b24queue.events.event import EVENT_NAME, MAX_EVENT_NAME, Event
from b24queue.offline.puller import Caller
from b24queue.portal.api import PortalError
from b24queue.portal.client import PortalClient
from b24queue.portal.clients import PortalClients
from b24queue.settings import Settings

# Bitrix24's answer when the same handler is bound twice: not a failure for us. Portals answer
# ERROR_CORE "Handler already binded" (the event.bind page documents ERROR_EVENT_NOT_FOUND only).
ALREADY = frozenset({"ERROR_HANDLER_ALREADY_EXIST"})


def already_bound(exc: PortalError) -> bool:
    """Whether an event.bind failed only because that handler is bound already."""
    if exc.code in ALREADY:
        return True
    return exc.code == "ERROR_CORE" and "already bind" in exc.description.lower()


@dataclass(frozen=True, slots=True)
class Bound:
    event: str
    outcome: str  # "bound", "already bound", or the portal's error code


def portal_event(record: PortalRecord) -> Event:
    """The portal client is made per event (b24queue.portal): this one names the portal, with
    its own application token (never published: it only opens that portal's credentials)."""
    auth = {
        "member_id": record.member_id,
        "domain": record.domain,
        "application_token": record.token,
    }
    return Event.from_payload({"event": "ONOFFLINEEVENT", "auth": auth})


def check_names(events: list[str]) -> list[str]:
    names = []
    for name in events:
        if len(name) > MAX_EVENT_NAME or not EVENT_NAME.fullmatch(name):
            raise ConfigError(f"bind-offline: {name[:64]!r} is not a Bitrix24 event name")
        names.append(name.upper())
    return names


async def bind_events(
    portal: Caller,
    events: list[str],
    auth_connector: str,
    ping_url: str | None,
    ping_min_timeout_s: int | None = None,
) -> list[Bound]:
    done = []
    for name in check_names(events):
        params = {"event": name, "event_type": "offline", "auth_connector": auth_connector}
        done.append(Bound(name, await _bind(portal, params)))
    if ping_url:
        ping: dict[str, Any] = {"event": "ONOFFLINEEVENT", "handler": ping_url}
        if ping_min_timeout_s is not None:
            # Bitrix24 pings at most once per minTimeout seconds (its default: 1).
            ping["options"] = {"minTimeout": ping_min_timeout_s}
        done.append(Bound("ONOFFLINEEVENT", await _bind(portal, ping)))
    return done


async def _bind(portal: Caller, params: dict[str, Any]) -> str:
    try:
        await portal.call("event.bind", params)
    except PortalError as exc:
        return "already bound" if already_bound(exc) else exc.code
    return "bound"


async def bind_offline(
    settings: Settings, member_id: str, events: list[str], ping_url: str | None
) -> list[Bound]:
    check_names(events)
    if ping_url is not None and not ping_url.startswith("https://"):
        raise ConfigError("bind-offline: --ping-url must be the ingress's https:// address")
    async with installed_portal(settings, member_id, "bind-offline") as portal:
        return await bind_events(
            portal,
            events,
            settings.offline_auth_connector,
            ping_url,
            settings.offline_ping_min_timeout_s,
        )


@asynccontextmanager
async def installed_portal(
    settings: Settings, member_id: str, command: str
) -> AsyncIterator[PortalClient]:
    """The client of an installed portal, for a CLI command (`command` names it in the error
    when no portal has that member_id); its store and clients closed on leaving."""
    store = open_store(settings.portal_store)
    try:
        record = await store.get(member_id)
        if record is None:
            raise ConfigError(f"{command}: no installed portal with member_id {member_id!r}")
        async with PortalClients(settings, store=store) as clients:
            yield clients.for_event(portal_event(record))
    finally:
        await store.close()
