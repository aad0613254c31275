"""The Redis Streams transport's worker side: the `Leases` of `b24queue.transports.kit.leased` on
the store's scripts, acks group-committed, wake-ups by a blocking read on the queues' streams."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from b24queue import _constants as c
from b24queue.queues import QueueSpec
from b24queue.settings import Settings
from b24queue.transports import connection_name
from b24queue.transports.kit.batching import Batcher
from b24queue.transports.kit.leased import ALIVE_S, LeasedWorkers, Row
from b24queue.transports.redis_streams.connection import CONNECTION_ERRORS, connect
from b24queue.transports.redis_streams.store import Store, text

log = logging.getLogger(__name__)


class Waker:
    """One connection per worker process blocking on `XREAD` over its queues' streams: a new
    entry wakes that queue's runner at once (the claim itself is a script)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self._settings = settings
        self._store = store
        self._client = connect(settings, connection_name("worker-wake"))
        self._events: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None

    def event(self, queue: str) -> asyncio.Event:
        if queue not in self._events:
            self._events[queue] = asyncio.Event()
            if self._task is not None:
                self._task.cancel()  # read again, with this stream too
            self._task = asyncio.create_task(self._watch(), name="b24queue-redis-wake")
        return self._events[queue]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(self._client.aclose(), return_exceptions=True)

    async def _watch(self) -> None:
        streams = {self._store.stream(q): q for q in self._events}
        last: dict[Any, Any] = {}
        block_ms = int(self._settings.redis_poll_s * 1000)
        while True:
            try:
                if not last:
                    for key in streams:
                        newest: Any = await self._client.xrevrange(key, count=1)
                        last[key] = text(newest[0][0]) if newest else "0-0"
                found: Any = await self._client.xread(last, count=1, block=block_ms)
                for key, _ in found or []:
                    name = text(key)
                    self._events[streams[name]].set()
                    newest = await self._client.xrevrange(name, count=1)
                    if newest:
                        last[name] = text(newest[0][0])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: the runners poll meanwhile
                log.debug("wake-up read failed: %r", exc)
                last = {}
                await asyncio.sleep(self._settings.reconnect_interval_s)


@dataclass(frozen=True, slots=True)
class _Ack:
    row: Row
    owner: str
    queue: str


# A worker not heard of for this long has crashed: its heartbeat is forgotten, and its consumer
# once the entries it held have been taken over (after their lease).
PRUNE_AFTER_S = 20 * ALIVE_S
# A fair queue's entries parked in no portal's list (`fair_mend.RECONCILE`) are looked for, all of
# them, when its runner starts, and again whenever a check this often finds the parking consumer
# holding more entries than the portals in the turns have ids in their lists.
MEND_CHECK_S = 60.0
_MENDED = "queue %s: %d events were parked in no portal's list (fair keys lost?): queued again"


class RedisLeases:
    def __init__(self, settings: Settings, store: Store, waker: Waker) -> None:
        self._store = store
        self._waker = waker
        self.where = f"{settings.redacted_broker_url()} prefix {settings.redis_prefix}"
        self.poll_s = settings.redis_poll_s
        self._acks: Batcher[_Ack, bool] = Batcher(
            self._ack_batch, "b24queue-redis-acks", CONNECTION_ERRORS
        )
        self._acks.start()
        self._mend_at: dict[str, float] = {}  # fair queues: when to check them next
        self._mending: dict[str, asyncio.Task[None]] = {}

    async def close(self) -> None:
        for task in self._mending.values():
            task.cancel()
        await asyncio.gather(*self._mending.values(), return_exceptions=True)
        await self._acks.stop()

    async def declare(self, spec: QueueSpec) -> list[str]:
        removed = await self._store.declare(spec)
        if spec.fairness.on:
            await self._mend(spec.name)
            self._mend_at[spec.name] = time.monotonic() + MEND_CHECK_S
        return removed

    async def _mend(self, queue: str) -> None:
        """Every entry parked in no portal's list added again (`fair_mend.RECONCILE`), in steps of
        bounded cost."""
        again = 0
        while True:
            added, finished = await self._store.reconcile(queue)
            again += added
            if finished:
                break
        if again:
            log.warning(_MENDED, queue, again)

    async def _mend_in_background(self, queue: str) -> None:
        try:
            await self._mend(queue)
        except Exception as exc:  # Redis away: the next check tries again
            log.warning("queue %s: looking for events parked in no list failed: %r", queue, exc)

    async def _check_parked(self, queue: str) -> None:
        if time.monotonic() < self._mend_at.get(queue, math.inf):
            return
        self._mend_at[queue] = time.monotonic() + MEND_CHECK_S
        running = self._mending.get(queue)
        if (running is None or running.done()) and await self._store.parked_unlisted(queue):
            self._mending[queue] = asyncio.create_task(
                self._mend_in_background(queue), name="b24queue-redis-mend"
            )

    def wake(self, queue: str) -> asyncio.Event:
        return self._waker.event(queue)

    async def claim(self, spec: QueueSpec, owner: str, count: int, lease_s: float) -> list[Row]:
        return await self._store.claim(spec.name, owner, count, lease_s, spec.fairness)

    async def _ack_batch(self, items: list[_Ack]) -> list[bool]:
        by_queue: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_queue.setdefault(item.queue, []).append(i)
        done = [False] * len(items)
        for queue, indexes in by_queue.items():
            acked = await self._store.ack(queue, [(items[i].row, items[i].owner) for i in indexes])
            for i, ok in zip(indexes, acked, strict=True):
                done[i] = ok
        return done

    async def ack(self, row: Row, owner: str, queue: str) -> bool:
        return await self._acks.submit(_Ack(row, owner, queue))

    async def move(
        self, row: Row, owner: str, *, queue: str, headers: dict[str, Any], delay_s: float
    ) -> bool:
        moved = await self._store.move(row, owner, queue=queue, headers=headers, delay_s=delay_s)
        if moved and not queue.endswith(c.DLQ_SUFFIX):
            asyncio.get_running_loop().call_later(delay_s, self.wake(queue).set)
        return moved

    async def beat(self, owner: str, queue: str, name: str, ids: list[Any], lease_s: float) -> None:
        await self._store.beat(owner, queue, name, ids, lease_s)
        await self._store.prune(queue, PRUNE_AFTER_S)
        await self._check_parked(queue)

    async def release(self, owner: str, queue: str) -> None:
        await self._store.release(queue, owner)

    async def leave(self, owner: str, queue: str) -> None:
        await self._store.leave(queue, owner)


def workers(settings: Settings, store: Store) -> LeasedWorkers:
    """A worker process's session: its runners share the store's connection, one waker and one
    group commit of acks."""
    waker = Waker(settings, store)
    leases = RedisLeases(settings, store, waker)

    async def close_store() -> None:
        await asyncio.gather(store.client.aclose(), return_exceptions=True)

    return LeasedWorkers(leases, leases.close, waker.stop, close_store)
