"""Process lifecycle: what starts in which order, and how it stops.

Ingress: verifier (config errors first) -> publisher connects in the background -> HTTP listens.
  Stop: stop listening, let in-flight requests finish (their publishes are still confirmed),
  then close the channel and the connection.
Worker: connect -> per consumer: channel, QoS, topology, on_start, consume.
  Stop: cancel every consumer (no new deliveries) -> wait for in-flight handlers up to
  `shutdown_timeout_s`, while the connection stays open so heartbeats and acks flow -> cancel
  what is left (unacked, so the broker redelivers it) -> on_stop, channels, connection.
A second SIGINT/SIGTERM exits at once; unacked messages go back to their queues all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from b24queue import redaction
from b24queue.auth.portal import PortalVerifier
from b24queue.auth.store import open_store
from b24queue.auth.tokens import StaticTokens, TokenVerifier, verifier_from_settings
from b24queue.consumer import EventConsumer
from b24queue.envelope import EventSink
from b24queue.errors import ConfigError
from b24queue.http.ingress import create_app, serve
from b24queue.http.portal_check import PortalCallback
from b24queue.ingress.fallback import SpoolingSink
from b24queue.ingress.spool import Spool, merge_stray_spools, slot_path
from b24queue.layout import QueueState
from b24queue.metrics import IngressMetrics, WorkerMetrics
from b24queue.portal.api import PortalProvider
from b24queue.portal.clients import PortalClients
from b24queue.settings import Settings
from b24queue.transports import Runner, WorkerSession, connection_name, transport_for

log = logging.getLogger(__name__)


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: shutting down gracefully", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)


async def serve_ingress(
    settings: Settings,
    stop: asyncio.Event,
    *,
    host: str,
    port: int,
    sock: socket.socket | None = None,
    slot: int = 0,
) -> None:
    """One ingress process. Alone it listens on host:port; as one of several (`prefork`) it is
    handed the parent's listening `sock` and its `slot` (which spool file is its own)."""
    verifier = verifier_from_settings(settings)
    metrics = IngressMetrics()
    async with contextlib.AsyncExitStack() as stack:
        if settings.portal_verification:
            verifier = await _portal_verifier(settings, verifier, stack)
        transport = transport_for(settings)
        publisher = await stack.enter_async_context(
            transport.publisher(connection_name("ingress", f"#{slot}" if sock else ""))
        )
        metrics.watch_unrouted(publisher.unrouted)
        sink: EventSink = publisher
        if not transport.needs_spool:
            log.info("%s: the queue is on this host's disk, no spool needed", transport.name)
        elif settings.spool_enabled:
            spool_path = Path(settings.spool_path)
            if sock is None:
                merge_stray_spools(spool_path, keep=1)
            spool = await stack.enter_async_context(
                Spool(slot_path(spool_path, slot), settings.spool_max_events)
            )
            spooling = await stack.enter_async_context(
                SpoolingSink(
                    publisher,
                    spool,
                    bypass_s=settings.spool_bypass_s,
                    retry_interval_s=settings.reconnect_interval_s,
                )
            )
            metrics.watch_spool(spooling)
            sink = spooling
            log.info("spool at %s (up to %d events)", spool.path, spool.max_events)
        else:
            log.warning("spool off: while the queue is unavailable, events are refused with 503")
        app = create_app(settings, sink, verifier, metrics)
        runner = await serve(app, host=host, port=port, sock=sock)
        # Exits in reverse: HTTP stops (in-flight requests finish) before the spool and the
        # broker connection close.
        stack.push_async_callback(runner.cleanup)
        if sock is None:
            log.info("ingress listening on http://%s:%d%s", host, port, settings.http_path)
        else:
            stack.enter_context(_stop_when_orphaned(stop))
        stopping = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(publisher.failed())
        await asyncio.wait({stopping, failed}, return_when=asyncio.FIRST_COMPLETED)
        for task in (stopping, failed):
            task.cancel()
        await asyncio.gather(stopping, failed, return_exceptions=True)
        if failed.done() and not failed.cancelled():
            raise failed.result()


@contextlib.contextmanager
def _stop_when_orphaned(stop: asyncio.Event) -> Iterator[None]:
    """A child of `prefork` drains and exits if its parent is gone (killed with no chance to
    forward a signal), rather than serve on unsupervised."""
    parent = os.getppid()
    loop = asyncio.get_running_loop()
    handle: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal handle
        if os.getppid() != parent:
            log.warning("parent process %d is gone: shutting down", parent)
            stop.set()
            return
        handle = loop.call_later(1.0, check)

    check()
    try:
        yield
    finally:
        if handle is not None:
            handle.cancel()


async def _portal_verifier(
    settings: Settings, static: TokenVerifier, stack: contextlib.AsyncExitStack
) -> PortalVerifier:
    store = open_store(settings.portal_store)
    stack.push_async_callback(store.close)
    check = None
    if settings.portal_callback:
        check = await stack.enter_async_context(PortalCallback(settings))
    else:
        log.warning(
            "B24QUEUE_PORTAL_CALLBACK=false: a first ONAPPINSTALL from any portal is trusted "
            "unchecked; reinstalls with a new token are refused"
        )
    log.info("per-portal tokens in %s", redaction.redact_url(settings.portal_store))
    return PortalVerifier(store, check, static if isinstance(static, StaticTokens) else None)


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

    @property
    def queues(self) -> str:
        return ",".join(cls.queue for cls in self.classes)

    async def __aenter__(self) -> Worker:
        if self._portals is None:
            own = PortalClients(self.settings, observer=self.metrics)
            self._own_portals = await own.__aenter__()
        portals = self._portals or self._own_portals
        try:
            session = self._session = await transport_for(self.settings).open_workers(self.classes)
        except BaseException:
            await self._close()
            raise
        try:
            for cls in self.classes:
                consumer = cls()
                consumer.portals = portals
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
) -> list[QueueState]:
    """Declare what these consumers need on the transport; report each queue."""
    check_consumers(classes)
    return await transport_for(settings).declare(classes)
