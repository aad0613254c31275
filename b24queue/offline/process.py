"""The `b24queue offline` process: what it opens in which order, and how it stops.

Start: portal store and shared state -> portal clients (no I/O yet) -> publisher (connects in the
background) -> the wake-up consumer (its queue bound to ONOFFLINEEVENT) -> the pullers.
Stop: pullers finish the batch they publish (and clear it), then the consumer, the publisher and
the clients close, in reverse. A second SIGINT/SIGTERM exits at once (b24queue.process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from b24queue.auth.store import open_store
from b24queue.offline.service import OfflineService, wake_consumer
from b24queue.portal.clients import PortalClients
from b24queue.portal.state import open_state
from b24queue.process import until_stopped
from b24queue.settings import Settings
from b24queue.telemetry.metrics import OfflineMetrics
from b24queue.transports import connection_name, transport_for
from b24queue.worker import Worker

if TYPE_CHECKING:
    from aiohttp.abc import AbstractResolver

log = logging.getLogger(__name__)


async def serve_offline(
    settings: Settings,
    stop: asyncio.Event,
    *,
    resolver: AbstractResolver | None = None,
    metrics: OfflineMetrics | None = None,
    wanted: tuple[str, ...] = (),
) -> OfflineMetrics:
    """Run until `stop`; returns the counts. `wanted`: the online events kept bound on every
    installed portal (b24queue.offline.bindings), when B24QUEUE_EVENTS_HANDLER_URL is set.
    `resolver` and `metrics`: for tests."""
    metrics = metrics or OfflineMetrics()
    if settings.offline_metrics_port:
        metrics.serve(settings.worker_metrics_host, settings.offline_metrics_port)
    async with contextlib.AsyncExitStack() as stack:
        store = open_store(settings.portal_store)
        stack.push_async_callback(store.close)
        state = open_state(settings.portal_store)
        stack.push_async_callback(state.close)
        clients = await stack.enter_async_context(
            PortalClients(settings, store=store, state=state, resolver=resolver)
        )
        publisher = await stack.enter_async_context(
            transport_for(settings).publisher(connection_name("offline"))
        )
        metrics.watch_unrouted(publisher.unrouted)
        service = OfflineService(settings, clients.for_event, publisher, store, state, metrics)
        consumers = [wake_consumer(settings, service)]
        bindings = None
        if settings.events_handler_url:
            from b24queue.offline.bindings import BindingsService, Reconciler, lifecycle_consumer

            reconciler = Reconciler(settings, clients.for_event, state, wanted)
            bindings = BindingsService(reconciler, store)
            consumers.append(lifecycle_consumer(settings, bindings))
        await stack.enter_async_context(Worker(settings, consumers, portals=clients))
        log.info(
            "offline puller running (auth_connector %s, batch %d, poll every %gs)",
            settings.offline_auth_connector,
            settings.offline_batch,
            settings.offline_poll_s,
        )
        # Should the publisher give up for good, the pullers stop, then it says why.
        work = service.run(stop)
        if bindings is not None:
            work = _together(work, bindings.run(stop))
        await until_stopped(stop, publisher.failed(), work)
        log.info("offline puller stopped: %s", metrics.totals)
    return metrics


async def _together(*works: Awaitable[None]) -> None:
    await asyncio.gather(*works)
