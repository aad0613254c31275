"""The Redis Streams transport: the moderate tier (`B24QUEUE_BROKER_URL=redis://host:6379/0`).

The guarantees every transport keeps (docs/transports/index.md):
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
- with `fair_share` (the default) a claim gives its slots to the portals in turn, kept in Redis
  (`fair.FAIR_CLAIM`: the same stream and group, new entries parked in per-portal lists;
  entries parked in no list found again: `fair_mend`), and `status` counts the portals waiting
  (`fair_status`);
- while Redis is unreachable the ingress spools and forwards later;
- idle workers wake at once by a blocking read on their streams, and poll every
  `B24QUEUE_REDIS_POLL_S` behind it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from b24queue import _constants as c
from b24queue.consumer import EventConsumer
from b24queue.queues import DeclaredQueue, spec_for
from b24queue.settings import Settings
from b24queue.transports import connection_name, worker_connection_name
from b24queue.transports.kit.leased import ALIVE_S, LeasedWorkers
from b24queue.transports.kit.tables import TableDeadLetters, table_status
from b24queue.transports.redis_streams.dlq import dead_letters
from b24queue.transports.redis_streams.publisher import RedisPublisher
from b24queue.transports.redis_streams.runner import workers
from b24queue.transports.redis_streams.store import check_for_workers, opened
from b24queue.transports.status import Status

log = logging.getLogger(__name__)


class Redis:
    name = "redis"
    shares_by_portal = True  # fair claims (fair.FAIR_CLAIM)
    caps_per_portal = True
    needs_spool = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def publisher(self, connection_name: str) -> RedisPublisher:
        return RedisPublisher(self.settings, connection_name)

    async def open_workers(self, classes: Sequence[type[EventConsumer]]) -> LeasedWorkers:
        name = worker_connection_name(classes)
        store = await opened(self.settings, name)
        try:
            await check_for_workers(store)
        except BaseException:
            await store.client.aclose()
            raise
        return workers(self.settings, store)

    async def declare(self, classes: Sequence[type[EventConsumer]]) -> list[DeclaredQueue]:
        store = await opened(self.settings, connection_name("topology"))
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
        return [DeclaredQueue(n, counts[n], 0, where) for n in names]

    async def status(self) -> Status:
        store = await opened(self.settings, connection_name("status"))
        try:
            view = await store.overview(ALIVE_S)
            memory = await store.memory()
        finally:
            await store.client.aclose()
        return dataclasses.replace(table_status(self.settings, view, "redis"), memory=memory)

    def dead_letters(self, queue: str) -> TableDeadLetters:
        return dead_letters(self.settings, queue)


def transport(settings: Settings) -> Redis:
    return Redis(settings)
