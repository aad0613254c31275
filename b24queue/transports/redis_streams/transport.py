"""The Redis Streams transport: the moderate tier (`B24QUEUE_BROKER_URL=redis://host:6379/0`).

The same guarantees as on RabbitMQ (`shared/TRANSPORTS.md`):
- a 200 means every copy of the event (one stream entry per bound queue, or one in the unrouted
  stream) was written by one script, so atomically, and Redis runs with `appendonly yes` and
  `appendfsync always` (checked at start: the ingress refuses to run otherwise, unless
  `B24QUEUE_REDIS_ALLOW_UNSAFE=true`); concurrent requests share one script call;
- a consumer queue is a stream with a consumer group; a runner reads up to `prefetch` entries,
  its lease is the entries' idle time in the group (renewed by its heartbeat), entries idle past
  the lease are taken over with `XAUTOCLAIM` and flagged redelivered; ack is `XACK` + `XDEL`;
  retries wait in a sorted set by due time and go back into the stream when due; dead letters go
  to the `<queue>.dlq` stream with their metadata; each settlement one script, fenced by the
  entry's consumer and delivery count;
- while Redis is unreachable the ingress spools and forwards later;
- idle workers wake at once by a blocking read on their streams, and poll every
  `B24QUEUE_REDIS_POLL_S` behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from b24queue import _constants as c
from b24queue.consumer import EventConsumer
from b24queue.envelope import Envelope
from b24queue.errors import B24QueueError, BrokerUnavailableError
from b24queue.layout import QueueSpec, QueueState, spec_for
from b24queue.metrics import WorkerMetrics
from b24queue.settings import Settings
from b24queue.status import Status
from b24queue.transports import Runner, connection_name, given_up
from b24queue.transports.batching import Batcher
from b24queue.transports.leased import ALIVE_S, LeasedRunner, Row
from b24queue.transports.redis_streams.store import (
    CONNECTION_ERRORS,
    Store,
    check_durable,
    check_for_workers,
    connect,
    text,
    translate,
)
from b24queue.transports.tables import TableDeadLetters, table_status
from b24queue.transports.unrouted import UnroutedCap

log = logging.getLogger(__name__)


async def _opened(settings: Settings, name: str) -> Store:
    client = connect(settings, name)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        raise translate(exc, settings) from None
    return Store(client, settings)


class RedisPublisher:
    """The ingress's sink: `publish` returns once the script holding the event has run (with
    `appendfsync always`: once Redis has it in its append-only file)."""

    def __init__(self, settings: Settings, name: str) -> None:
        self._settings = settings
        self._name = name
        self._store: Store | None = None
        self._ready = False
        self._task: asyncio.Task[None] | None = None
        self._batches: Batcher[Envelope, None] = Batcher(
            self._write, "b24queue-redis-publish", CONNECTION_ERRORS
        )
        self.breaks = 0
        self.unrouted = UnroutedCap(settings)

    async def __aenter__(self) -> RedisPublisher:
        self._batches.start()
        self._task = asyncio.create_task(self._keep(), name="b24queue-redis-publisher")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._batches.stop()
        if self._store is not None:
            await asyncio.gather(self._store.client.aclose(), return_exceptions=True)

    async def _keep(self) -> None:
        """Check the server once (persistence), then watch the connection: `_ready` goes false
        on a failure and true again once a ping answers."""
        while True:
            try:
                store = await self._checked()
                break
            except B24QueueError as exc:
                if not isinstance(exc, BrokerUnavailableError):
                    raise
                log.warning("%s; retrying", exc)
            except Exception as exc:
                log.warning("Redis not ready (%r); retrying", exc)
            await asyncio.sleep(self._settings.reconnect_interval_s)
        self._store = store
        self._ready = True
        log.info(
            "publishing to %s prefix %s (appendfsync always)",
            self._settings.redacted_broker_url(),
            self._settings.redis_prefix,
        )
        while True:
            await asyncio.sleep(self._settings.reconnect_interval_s)
            if self._ready:
                continue
            try:
                await store.client.ping()
            except Exception as exc:
                log.debug("Redis still away: %r", exc)
                continue
            self._ready = True
            log.info("Redis answers again")

    async def _checked(self) -> Store:
        """A connection to a Redis that keeps events as b24queue needs, the unrouted queue
        declared; closed when not (each retry opens its own)."""
        store = await _opened(self._settings, self._name)
        try:
            await check_durable(store.client, self._settings)
            await store.declare_unrouted()
        except BaseException:
            await asyncio.gather(store.client.aclose(), return_exceptions=True)
            raise
        return store

    async def failed(self) -> BaseException:
        return await given_up(self._task)

    def is_ready(self) -> bool:
        return self._store is not None and self._ready

    async def _write(self, envelopes: list[Envelope]) -> list[None]:
        assert self._store is not None
        try:
            dropped = await self._store.publish(envelopes, self.unrouted)
        except CONNECTION_ERRORS:
            if self._ready:
                self.breaks += 1
            self._ready = False
            raise
        self.unrouted.dropped(*dropped)
        return [None] * len(envelopes)

    async def publish(self, envelope: Envelope) -> None:
        if not self.is_ready():
            raise BrokerUnavailableError("not connected to Redis")
        timeout_s = self._settings.publish_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await self._batches.submit(envelope)
        except TimeoutError:
            raise BrokerUnavailableError(f"Redis did not answer within {timeout_s:g}s") from None
        except CONNECTION_ERRORS as exc:
            raise BrokerUnavailableError(f"connection to Redis failed: {exc!r}") from None
        except BrokerUnavailableError:  # over maxmemory (says so)
            raise
        except Exception as exc:  # a read-only replica: try again later
            raise BrokerUnavailableError(f"Redis refused the write: {exc!r}") from None


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

    async def close(self) -> None:
        await self._acks.stop()

    async def declare(self, spec: QueueSpec) -> list[str]:
        return await self._store.declare(spec)

    def wake(self, queue: str) -> asyncio.Event:
        return self._waker.event(queue)

    async def claim(self, queue: str, owner: str, count: int, lease_s: float) -> list[Row]:
        return await self._store.claim(queue, owner, count, lease_s)

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

    async def release(self, owner: str, queue: str) -> None:
        await self._store.release(queue, owner)

    async def leave(self, owner: str, queue: str) -> None:
        await self._store.leave(queue, owner)


class RedisWorkers:
    def __init__(self, settings: Settings, store: Store) -> None:
        self._store = store
        self._waker = Waker(settings, store)
        self._leases = RedisLeases(settings, store, self._waker)

    def runner(self, consumer: EventConsumer, metrics: WorkerMetrics | None) -> LeasedRunner:
        return LeasedRunner(consumer, self._leases, metrics)

    async def started(self, runners: Sequence[Runner]) -> None:
        return None

    async def close(self) -> None:
        await self._leases.close()
        await self._waker.stop()
        await asyncio.gather(self._store.client.aclose(), return_exceptions=True)


class Redis:
    name = "redis"
    needs_spool = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def publisher(self, connection_name: str) -> RedisPublisher:
        return RedisPublisher(self.settings, connection_name)

    async def open_workers(self, classes: Sequence[type[EventConsumer]]) -> RedisWorkers:
        name = connection_name("worker", ",".join(cls.queue for cls in classes))
        store = await _opened(self.settings, name)
        try:
            await check_for_workers(store)
        except BaseException:
            await store.client.aclose()
            raise
        return RedisWorkers(self.settings, store)

    async def declare(self, classes: Sequence[type[EventConsumer]]) -> list[QueueState]:
        store = await _opened(self.settings, connection_name("topology"))
        try:
            await store.declare_unrouted()
            for cls in classes:
                spec = spec_for(cls)
                for key in await store.declare(spec):
                    log.info("queue %s: removed binding %s", spec.name, key)
            names = [self.settings.unrouted]
            names += [n for cls in classes for n in (cls.queue, cls.queue + c.DLQ_SUFFIX)]
            counts = {n: await store.count(n) for n in names}
        finally:
            await store.client.aclose()
        where = {"transport": "redis", "prefix": self.settings.redis_prefix}
        return [QueueState(n, counts[n], 0, where) for n in names]

    async def status(self) -> Status:
        store = await _opened(self.settings, connection_name("status"))
        try:
            view = await store.overview(ALIVE_S)
            memory = await store.memory()
        finally:
            await store.client.aclose()
        return dataclasses.replace(table_status(self.settings, view, "redis"), memory=memory)

    def dead_letters(self, queue: str) -> TableDeadLetters:
        held: list[Store] = []

        async def open_shelf() -> Store:
            held.append(await _opened(self.settings, connection_name("dlq", queue)))
            return held[0]

        async def close_shelf() -> None:
            while held:
                with contextlib.suppress(Exception):
                    await held.pop().client.aclose()

        return TableDeadLetters(self.settings, queue, open_shelf, close_shelf)


def transport(settings: Settings) -> Redis:
    return Redis(settings)
