"""The fake portal's online event bindings (Bitrix24's event.bind, event.get, event.unbind),
registered on the fake REST side (`FakeEvents.attach(fake_portal.rest)`), as the Bitrix24 REST
documentation (b24restdocs, api-reference/events/) describes them:

- `event.bind(event, handler, auth_type?, event_type?)`: 200 {"result": true}. An unknown event:
  400 ERROR_EVENT_NOT_FOUND "Event not found" (the documented code); the same event, handler
  and auth_type bound twice: 400 ERROR_CORE "Handler already binded" (what portals answer).
  event_type=offline is not answered here (fake_offline.py has it; attach this fake first).
- `event.get`: every binding, {"event", "handler", "auth_type", "offline": 0}.
- `event.unbind(event, handler, auth_type?)`: removes every binding matching the parameters
  *given* (documented: a parameter left out matches all), answers {"count": n}.

Tests see and change each portal's bindings (`bindings[host]`), count the calls (`calls`), and
can make the portal's event.get hostile (`get_extra`: entries added to its answer).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from tests.support.fake_rest import FakeRest

Answer = tuple[int, dict[str, Any]]
KNOWN = re.compile(r"ON[A-Z0-9_]{2,100}")


@dataclass(frozen=True)
class Bound:
    event: str
    handler: str
    auth_type: str = "0"

    def shown(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "handler": self.handler,
            "auth_type": self.auth_type,
            "offline": 0,
        }


class FakeEvents:
    def __init__(self) -> None:
        self.bindings: dict[str, list[Bound]] = {}  # by host
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.get_extra: list[Any] = []
        self.slow_s = 0.0  # each bind and unbind takes this long (two reconcilers overlap)

    @classmethod
    def attach(cls, rest: FakeRest) -> FakeEvents:
        events = cls()
        rest.extensions.insert(0, events.answer)
        return events

    def of(self, host: str) -> list[Bound]:
        return self.bindings.setdefault(host, [])

    def count(self, method: str) -> int:
        return sum(m == method for _, m, _ in self.calls)

    async def answer(self, host: str, method: str, params: dict[str, Any]) -> Answer | None:
        if method not in ("event.bind", "event.get", "event.unbind"):
            return None
        if str(params.get("event_type") or "online").lower() == "offline":
            return None
        if method == "event.bind" and str(params.get("event") or "").upper() == "ONOFFLINEEVENT":
            return None  # the offline queue's ping (fake_offline.py)
        self.calls.append((host, method, params))
        bound = self.of(host)
        if method == "event.get":
            return 200, {"result": [b.shown() for b in bound] + list(self.get_extra)}
        if self.slow_s:
            await asyncio.sleep(self.slow_s)
        if method == "event.bind":
            return self._bind(bound, params)
        return self._unbind(host, bound, params)

    def _bind(self, bound: list[Bound], params: dict[str, Any]) -> Answer:
        event = str(params.get("event") or "").upper()
        handler = str(params.get("handler") or "")
        if not KNOWN.fullmatch(event):
            return 400, {"error": "ERROR_EVENT_NOT_FOUND", "error_description": "Event not found"}
        if not handler:
            return 400, {"error": "ERROR_ARGUMENT", "error_description": "Handler is required"}
        new = Bound(event, handler, str(params.get("auth_type") or "0"))
        if new in bound:
            return 400, {"error": "ERROR_CORE", "error_description": "Handler already binded"}
        bound.append(new)
        return 200, {"result": True}

    def _unbind(self, host: str, bound: list[Bound], params: dict[str, Any]) -> Answer:
        event = str(params.get("event") or "").upper()
        handler = str(params.get("handler") or "")
        auth_type = str(params.get("auth_type") or "")
        gone = [
            b
            for b in bound
            if (not event or b.event == event)
            and (not handler or b.handler == handler)
            and (not auth_type or b.auth_type == auth_type)
        ]
        self.bindings[host] = [b for b in bound if b not in gone]
        return 200, {"result": {"count": len(gone)}}
