"""In-memory stand-ins for the offline puller's unit tests (no broker, no HTTP): a portal client
whose `event.offline.get` answers are scripted, the shared state and the portal store (the sink:
tests/support/sinks.py). The portal's side over HTTPS, for the other tests: fake_offline.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from b24queue.auth.record import PortalRecord
from b24queue.portal.limits import Limit

Answer = Callable[[dict[str, Any]], Any]  # the get's params -> its result, or raises


def one_record_batch(params: dict[str, Any]) -> dict[str, Any]:
    """A reservation of one record (the same process_id when it is asked for again)."""
    row = {
        "ID": "1",
        "TIMESTAMP_X": "2026-11-29T23:00:00+03:00",
        "EVENT_NAME": "ONCRMDEALUPDATE",
        "EVENT_DATA": {"FIELDS": {"ID": "1"}},
        "EVENT_ADDITIONAL": {},
        "MESSAGE_ID": "msg1",
    }
    return {"process_id": params.get("process_id", "p1"), "events": [row]}


class ScriptedPortal:
    """`get` answers each event.offline.get; every call is kept with its loop time."""

    def __init__(self, get: Answer) -> None:
        self.get = get
        self.calls: list[tuple[float, str, dict[str, Any]]] = []

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        given = dict(params or {})
        self.calls.append((asyncio.get_running_loop().time(), method, given))
        if method == "event.offline.get":
            return self.get(given)
        return True

    async def list(
        self, method: str, params: Mapping[str, Any] | None = None, *, max_items: int = 100_000
    ) -> AsyncIterator[Any]:
        for item in ():  # nothing reserved and forgotten
            yield item

    def times(self, method: str = "event.offline.get") -> list[float]:
        return [at for at, m, _ in self.calls if m == method]


class State:
    async def reserve(self, key: str, limit: Limit) -> float | None:
        return 0.0

    def __init__(self) -> None:
        self.renewed: list[str] = []
        self.released: list[str] = []

    async def hold(self, key: str, method: str, for_s: float) -> None:
        return None

    async def held(self, key: str, method: str) -> float:
        return 0.0

    async def lease(self, key: str, owner: str, ttl_s: float) -> bool:
        return True

    async def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        self.renewed.append(key)
        return True

    async def release(self, key: str, owner: str) -> None:
        self.released.append(key)

    async def close(self) -> None:
        return None


class Store:
    def __init__(self, *records: PortalRecord) -> None:
        self.records = list(records)

    async def all(self) -> list[PortalRecord]:
        return list(self.records)
