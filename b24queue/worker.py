"""The worker process (`b24queue worker`): what starts in which order, and how it stops.

Start: connect -> per consumer: channel, QoS, topology, on_start, consume.
Stop: cancel every consumer (no new deliveries) -> wait for in-flight handlers up to
`shutdown_timeout_s`, while the connection stays open so heartbeats and acks flow -> cancel what
is left (unacked, so the broker redelivers it) -> on_stop, channels, connection.
A second SIGINT/SIGTERM exits at once (b24queue.process); unacked messages go back to their
queues all the same.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from b24queue.consumer import EventConsumer
from b24queue.errors import ConfigError
from b24queue.portal.api import PortalProvider
from b24queue.portal.clients import PortalClients
from b24queue.publishing import LazyPublisher
from b24queue.queues import DeclaredQueue
from b24queue.secrets import redaction
from b24queue.settings import Settings
from b24queue.telemetry.metrics import WorkerMetrics
from b24queue.transports import (
    Runner,
    WorkerSession,
    check_fairness,
    connection_name,
    transport_for,
)

log = logging.getLogger(__name__)


def check_consumers(classes: Sequence[type[EventConsumer]]) -> None:
    seen: dict[str, str] = {}
    for cls in classes:
        cls.check()
        if cls.queue in seen:
            raise ConfigError(
                f"{cls.__name__}.queue {cls.queue!r} is also the queue of {seen[cls.queue]}"
            )
        seen[cls.queue] = cls.__name__


class Worker:
    """Consumers of one process, on the transport the settings name.

    `async with Worker(settings, classes) as worker:` returns once every consumer consumes;
    leaving the block shuts down gracefully (see the module docstring).
    """

    def __init__(
        self,
        settings: Settings,
        classes: Sequence[type[EventConsumer]],
        metrics: WorkerMetrics | None = None,
        portals: PortalProvider | None = None,
    ) -> None:
        check_consumers(classes)
        # The errors its handlers raise are kept (a dead letter's headers) without these.
        redaction.remember(settings.secrets())
        self.settings = settings
        self.metrics = metrics
        self.classes = list(classes)
        self.runners: list[Runner] = []
        self._session: WorkerSession | None = None
        # Handlers' portal clients (`EventConsumer.portal`): given, or our own, opened with the
        # worker (no I/O until a handler calls a portal) and closed after the last handler.
        self._portals = portals
        self._own_portals: PortalClients | None = None
        # What handlers publish (`EventConsumer.publish`): connected at the first message.
        self._publisher: LazyPublisher | None = None

    @property
    def queues(self) -> str:
        return ",".join(cls.queue for cls in self.classes)

    async def __aenter__(self) -> Worker:
        transport = transport_for(self.settings)
        check_fairness(transport, self.classes)
        if self._portals is None:
            own = PortalClients(self.settings, observer=self.metrics)
            self._own_portals = await own.__aenter__()
        portals = self._portals or self._own_portals
        name = connection_name("publisher", self.queues)
        self._publisher = LazyPublisher(
            lambda: transport.publisher(name), self.settings.publish_timeout_s
        )
        try:
            session = self._session = await transport.open_workers(self.classes)
        except BaseException:
            await self._close()
            raise
        try:
            for cls in self.classes:
                consumer = cls()
                consumer.portals = portals
                consumer.outbox_publisher = self._publisher
                runner = session.runner(consumer, self.metrics)
                self.runners.append(runner)
                await runner.start()
            await session.started(self.runners)
        except BaseException:
            # Those already consuming stop first (nothing left running behind a failed start).
            await asyncio.gather(*(r.stop_consuming() for r in self.runners))
            await asyncio.gather(*(r.drain(0) for r in self.runners))
            await self._close()
            raise
        log.info("worker running: %s", self.queues)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        runners = self.runners
        await asyncio.gather(*(r.stop_consuming() for r in runners))
        in_flight = sum(r.in_flight for r in runners)
        if in_flight:
            log.info(
                "waiting up to %gs for %d in-flight handler(s)",
                self.settings.shutdown_timeout_s,
                in_flight,
            )
        timeout_s = self.settings.shutdown_timeout_s
        cancelled = sum(await asyncio.gather(*(r.drain(timeout_s) for r in runners)))
        if cancelled:
            log.warning(
                "%d handler(s) did not finish in time; their events will be redelivered",
                cancelled,
            )
        await self._close()
        log.info("worker stopped")

    async def _close(self) -> None:
        for runner in self.runners:
            try:
                await runner.close()
            except Exception:
                log.exception("on_stop of %s failed", runner.spec.name)
        self.runners = []
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._own_portals is not None:
            await self._own_portals.__aexit__(None, None, None)
            self._own_portals = None
        if self._publisher is not None:
            await self._publisher.close()
            self._publisher = None


async def serve_worker(
    settings: Settings, classes: Sequence[type[EventConsumer]], stop: asyncio.Event
) -> None:
    metrics = WorkerMetrics()
    if settings.worker_metrics_port:
        metrics.serve(settings.worker_metrics_host, settings.worker_metrics_port)
        log.info(
            "worker metrics on http://%s:%d/metrics",
            settings.worker_metrics_host,
            settings.worker_metrics_port,
        )
    async with Worker(settings, classes, metrics):
        await stop.wait()


async def declare_topology(
    settings: Settings, classes: Sequence[type[EventConsumer]]
) -> list[DeclaredQueue]:
    """Declare what these consumers need on the transport; report each queue."""
    check_consumers(classes)
    return await transport_for(settings).declare(classes)
