"""The fake portal's offline event queues (Bitrix24's event.offline.*), registered on the fake
REST side (`FakeOffline.attach(fake_portal.rest)`), to the documented semantics:

- `event.bind` with event_type=offline and an auth_connector: that source's queue records the
  event from then on; with a `handler`, ONOFFLINEEVENT is sent there (`ping`) when records appear.
- one record per object and event: a change of an object already queued updates its record
  (TIMESTAMP_X, data) and takes it out of any reservation (PROCESS_ID emptied), so clearing the
  old reservation cannot drop the newer change.
- a change made by the app itself with auth_connector X is not recorded in X's queue.
- `event.offline.get`: clear=1 (the default) returns and deletes; clear=0 reserves under a
  process_id (new, or the one given: its records first, then new ones up to `limit`); parallel
  gets never share a record; error=1 reads records marked as errors instead.
- `event.offline.clear(process_id, id=[...] | message_id=[...])` deletes only records still
  reserved under that process_id; `event.offline.error(process_id, message_id=[...])` marks them.
- `event.offline.list(filter, start)`: read without reserving, 50 a page, `next`.

Tests can hold a method (`hold[method]`: a get reserves, then waits; a clear waits before it
clears), tamper with get's answer, and count what was cleared (`cleared`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tests.support.fake_rest import FakeRest

PAGE = 50
Answer = tuple[int, dict[str, Any]]


@dataclass
class Record:
    id: int
    connector: str
    event: str
    object_id: str
    message_id: str
    timestamp: str
    data: dict[str, Any]
    process_id: str = ""
    error: int = 0

    def shown(self) -> dict[str, Any]:
        return {
            "ID": str(self.id),
            "TIMESTAMP_X": self.timestamp,
            "EVENT_NAME": self.event,
            "EVENT_DATA": self.data,
            "EVENT_ADDITIONAL": {"user_id": "1"},
            "MESSAGE_ID": self.message_id,
            "PROCESS_ID": self.process_id,
            "ERROR": self.error,
        }


@dataclass
class PortalQueue:
    bindings: dict[str, set[str]] = field(default_factory=dict)  # connector -> event names
    records: dict[int, Record] = field(default_factory=dict)
    ping_handler: str = ""
    ping_min_timeout: Any = None  # the ping binding's options.minTimeout, as sent


class FakeOffline:
    def __init__(self) -> None:
        self.portals: dict[str, PortalQueue] = {}  # by host
        self._ids = itertools.count(1)
        self._processes = itertools.count(1)
        self.cleared: list[tuple[str, str, str]] = []  # (host, event, object id) per record cleared
        self.errored: list[str] = []  # MESSAGE_IDs marked
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.hold: dict[str, asyncio.Event] = {}
        self.arrived: dict[str, asyncio.Event] = {}
        self.tamper: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        # Sends ONOFFLINEEVENT for a host to its handler (set by tests: they know its tokens).
        self.ping: Callable[[str, str], Awaitable[None]] | None = None
        self.pings = 0
        self.failing: collections.Counter[str] = collections.Counter()  # method -> calls to fail

    @classmethod
    def attach(cls, rest: FakeRest) -> FakeOffline:
        offline = cls()
        rest.extensions.append(offline.answer)
        return offline

    def queue(self, host: str) -> PortalQueue:
        return self.portals.setdefault(host, PortalQueue())

    def waiting(self, host: str, connector: str = "b24queue") -> list[Record]:
        return [r for r in self.queue(host).records.values() if r.connector == connector]

    # -- what happens on the portal -------------------------------------------------------------
    async def change(
        self, host: str, event: str, object_id: int | str, *, source: str = ""
    ) -> None:
        """An object changed (by a user, or by the app with auth_connector `source`)."""
        q = self.queue(host)
        stamp = datetime.now(UTC).replace(microsecond=0).isoformat()
        for connector, events in q.bindings.items():
            if event not in events or connector == source:
                continue
            message_id = hashlib.md5(f"{event}|{object_id}".encode()).hexdigest()
            old = next(
                (
                    r
                    for r in q.records.values()
                    if (r.connector, r.message_id) == (connector, message_id)
                ),
                None,
            )
            if old is not None:
                old.timestamp, old.process_id, old.error = stamp, "", 0
                continue
            rid = next(self._ids)
            q.records[rid] = Record(
                rid, connector, event, str(object_id), message_id, stamp,
                {"FIELDS": {"ID": str(object_id)}},
            )  # fmt: skip
        if q.ping_handler and self.ping is not None:
            self.pings += 1
            # The app unreachable: Bitrix24 never sends it again.
            with contextlib.suppress(Exception):
                await self.ping(host, q.ping_handler)

    # -- the REST methods -----------------------------------------------------------------------
    async def answer(self, host: str, method: str, params: dict[str, Any]) -> Answer | None:
        if method != "event.bind" and not method.startswith("event.offline."):
            return None
        self.calls.append((host, method, params))
        if method in self.arrived:
            self.arrived[method].set()
        q = self.queue(host)
        connector = str(params.get("auth_connector") or "")
        if method == "event.bind":
            return self._failed(method) or self._bind(q, params, connector)
        if method == "event.offline.get":
            answer = self._get(q, params, connector)
            if not await self._held(method):
                return 503, {"error": "DROPPED", "error_description": "the caller is gone"}
            return 200, {"result": self.tamper(answer) if self.tamper else answer}
        if not await self._held(method):  # it never reached the portal
            return 503, {"error": "DROPPED", "error_description": "the caller is gone"}
        if method == "event.offline.clear":
            return 200, {"result": self._clear(host, q, params)}
        if method == "event.offline.error":
            return 200, {"result": self._error(q, params)}
        if method == "event.offline.list":
            return 200, self._list(q, params, connector)
        return 404, {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}

    def _failed(self, method: str) -> Answer | None:
        """An answer 500 while `failing` counts calls of this method to fail."""
        if self.failing[method] <= 0:
            return None
        self.failing[method] -= 1
        return 500, {"error": "INTERNAL_SERVER_ERROR", "error_description": "try again"}

    async def _held(self, method: str) -> bool:
        """Wait while the method is held; False if the hold was taken away before it was
        released (`drop`): the request is then as if its caller died before it arrived."""
        held = self.hold.get(method)
        if held is None:
            return True
        await held.wait()
        return self.hold.get(method) is held

    def drop(self, method: str) -> None:
        """Requests held on `method` go nowhere; later ones are not held."""
        held = self.hold.pop(method, None)
        if held is not None:
            held.set()

    def _bind(self, q: PortalQueue, params: dict[str, Any], connector: str) -> Answer:
        event = str(params.get("event") or "").upper()
        if params.get("event_type") == "offline":
            q.bindings.setdefault(connector, set()).add(event)
        elif event == "ONOFFLINEEVENT" and params.get("handler"):
            q.ping_handler = str(params["handler"])
            options = params.get("options")
            q.ping_min_timeout = options.get("minTimeout") if isinstance(options, dict) else None
        else:
            return 400, {"error": "ERROR_ARGUMENT", "error_description": "handler is required"}
        return 200, {"result": True}

    def _get(self, q: PortalQueue, params: dict[str, Any], connector: str) -> dict[str, Any]:
        limit = max(1, min(int(params.get("limit") or PAGE), 1000))
        error = int(params.get("error") or 0)
        mine = [r for r in q.records.values() if r.connector == connector and r.error == error]
        if str(params.get("clear", 1)) != "0":
            taken = sorted((r for r in mine if not r.process_id), key=lambda r: r.id)[:limit]
            for r in taken:
                del q.records[r.id]
            return {"process_id": None, "events": [r.shown() for r in taken]}
        process_id = str(params.get("process_id") or f"proc{next(self._processes):08d}")
        held = [r for r in mine if r.process_id == process_id]
        free = [r for r in mine if not r.process_id or (error and r.process_id != process_id)]
        for r in sorted(free, key=lambda r: r.id)[: max(0, limit - len(held))]:
            r.process_id = process_id
            held.append(r)
        events = [r.shown() for r in sorted(held, key=lambda r: r.id)]
        return {"process_id": process_id, "events": events}

    def _clear(self, host: str, q: PortalQueue, params: dict[str, Any]) -> bool:
        process_id = str(params.get("process_id") or "")
        ids = {str(i) for i in params.get("id") or []}
        message_ids = {str(m) for m in params.get("message_id") or []}
        for r in list(q.records.values()):
            if r.process_id != process_id or not process_id:
                continue
            if (ids and str(r.id) not in ids) or (
                not ids and message_ids and r.message_id not in message_ids
            ):
                continue
            del q.records[r.id]
            self.cleared.append((host, r.event, r.object_id))
        return True

    def _error(self, q: PortalQueue, params: dict[str, Any]) -> bool:
        process_id = str(params.get("process_id") or "")
        message_ids = {str(m) for m in params.get("message_id") or []}
        for r in q.records.values():
            if process_id and r.process_id == process_id and r.message_id in message_ids:
                r.error = 1
                self.errored.append(r.message_id)
        return True

    def _list(self, q: PortalQueue, params: dict[str, Any], connector: str) -> dict[str, Any]:
        wanted = params.get("filter") or {}
        rows = []
        for r in sorted(q.records.values(), key=lambda r: r.id):
            shown = r.shown()
            if r.connector == connector and all(_matches(shown, k, v) for k, v in wanted.items()):
                rows.append(shown)
        start = int(params.get("start") or 0)
        answer: dict[str, Any] = {"result": rows[start : start + PAGE], "total": len(rows)}
        if start + PAGE < len(rows):
            answer["next"] = start + PAGE
        return answer


def _matches(row: dict[str, Any], key: str, value: Any) -> bool:
    if key.startswith("!"):
        return str(row.get(key[1:])) != str(value)
    return str(row.get(key.lstrip("="))) == str(value)
