"""`b24queue dlq` on Redis: the `Shelf` of `b24queue.transports.kit.tables` is the store itself,
on one connection for the command's run."""

from __future__ import annotations

import contextlib

from b24queue.settings import Settings
from b24queue.transports import connection_name
from b24queue.transports.kit.tables import TableDeadLetters
from b24queue.transports.redis_streams.store import Store, opened


def dead_letters(settings: Settings, queue: str) -> TableDeadLetters:
    held: list[Store] = []

    async def open_shelf() -> Store:
        held.append(await opened(settings, connection_name("dlq", queue)))
        return held[0]

    async def close_shelf() -> None:
        while held:
            with contextlib.suppress(Exception):
                await held.pop().client.aclose()

    return TableDeadLetters(settings, queue, open_shelf, close_shelf)
