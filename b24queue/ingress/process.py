"""The ingress process (`b24queue ingress`): what starts in which order, and how it stops.

Start: verifier (config errors first) -> publisher connects in the background -> the spool, if
the transport needs one -> HTTP listens.
Stop: stop listening, let in-flight requests finish (their publishes are still confirmed), then
close the spool and the broker connection. A second SIGINT/SIGTERM exits at once
(b24queue.process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from b24queue.auth.install import PortalCallback
from b24queue.auth.portal import PortalVerifier
from b24queue.auth.store import open_store
from b24queue.auth.tokens import StaticTokens, TokenVerifier, verifier_from_settings
from b24queue.events.envelope import EventSink
from b24queue.ingress.app import create_app, serve
from b24queue.ingress.fallback import SpoolingSink
from b24queue.ingress.spool import Spool, merge_stray_spools, slot_path
from b24queue.process import until_stopped
from b24queue.secrets import redaction
from b24queue.settings import Settings
from b24queue.telemetry.metrics import IngressMetrics
from b24queue.transports import connection_name, transport_for

log = logging.getLogger(__name__)


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
        await until_stopped(stop, publisher.failed())


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
