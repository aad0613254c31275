"""Opt-in duplicate suppression for consumers, keyed by queue and message_id.

Delivery is at least once, so a consumer may see the same event twice: after a worker died
mid-handler (the broker redelivers), after a publish retried across a reconnect, after a spool
forward that crashed before its delete. A consumer that sets

    idempotency = MemorySeenStore()            # one process
    idempotency = RedisSeenStore("redis://…")  # several workers

skips (acks) an event whose message_id it already handled successfully. It is remembered only
after `handle` returned, so a failed attempt is retried as usual. Two copies handled at the very
same moment by two workers can both run: make the side effect itself idempotent where that
matters (an upsert, a unique key).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from b24queue.secrets.stores import RedisClient


class SeenStore(Protocol):
    async def seen(self, key: str) -> bool: ...

    async def remember(self, key: str) -> None: ...


class MemorySeenStore:
    """The last `max_items` keys of this process (an LRU)."""

    def __init__(self, max_items: int = 100_000) -> None:
        self.max_items = max_items
        self._keys: OrderedDict[str, None] = OrderedDict()

    async def seen(self, key: str) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        return False

    async def remember(self, key: str) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_items:
            self._keys.popitem(last=False)


class RedisSeenStore(RedisClient):
    """Keys in Redis with a TTL, shared by every worker. Needs `pip install b24queue[redis]`."""

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        ttl_s: int = 7 * 24 * 3600,
        prefix: str = "b24queue:seen:",
    ) -> None:
        super().__init__(url)
        self.ttl_s = ttl_s
        self.prefix = prefix

    async def seen(self, key: str) -> bool:
        return bool(await self._redis().exists(self.prefix + key))

    async def remember(self, key: str) -> None:
        await self._redis().set(self.prefix + key, b"1", ex=self.ttl_s)
