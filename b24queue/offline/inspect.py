"""`b24queue portals offline-status MEMBER_ID`: what a portal's offline queue holds for us, read
with event.offline.list (which reserves nothing): records waiting, reserved by a puller (and
not cleared yet), and marked as errors, by event name. Bounded: at most `MAX_ITEMS` are read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from b24queue.events.event import EVENT_NAME, MAX_EVENT_NAME
from b24queue.offline.bind import installed_portal
from b24queue.offline.puller import Caller
from b24queue.settings import Settings

MAX_ITEMS = 10_000
MAX_NAMES = 50  # event names shown; the rest counted under "other"


@dataclass(slots=True)
class QueueState:
    waiting: int = 0
    reserved: int = 0
    errors: int = 0
    read: int = 0
    by_event: Counter[str] = field(default_factory=Counter)

    @property
    def complete(self) -> bool:
        return self.read < MAX_ITEMS


async def queue_state(portal: Caller, auth_connector: str) -> QueueState:
    state = QueueState()
    params = {"auth_connector": auth_connector}
    async for item in portal.list("event.offline.list", params, max_items=MAX_ITEMS):
        state.read += 1
        if not isinstance(item, dict):
            continue
        if str(item.get("ERROR") or "0") not in ("0", "N", ""):
            state.errors += 1
        elif item.get("PROCESS_ID"):
            state.reserved += 1
        else:
            state.waiting += 1
        name = str(item.get("EVENT_NAME") or "")
        known = len(name) <= MAX_EVENT_NAME and EVENT_NAME.fullmatch(name)
        if known and (name in state.by_event or len(state.by_event) < MAX_NAMES):
            state.by_event[name.upper()] += 1
        else:
            state.by_event["other"] += 1
    return state


async def offline_status(settings: Settings, member_id: str) -> QueueState:
    async with installed_portal(settings, member_id, "offline-status") as portal:
        return await queue_state(portal, settings.offline_auth_connector)
