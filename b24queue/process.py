"""Running a service process (`b24queue ingress`, `worker`, `offline`), the same way for each:
logging set up before anything else, the event loop (uvloop where installed), SIGINT/SIGTERM, and
the wait until the service is told to stop. What each service opens, in which order, and how it
stops: b24queue.ingress.process, b24queue.worker, b24queue.offline.process.

The first SIGINT/SIGTERM sets the service's `stop` event: it shuts down gracefully. A second one
exits at once (code 1); what was not acknowledged goes back to its queue all the same. The exit
codes: b24queue.errors.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from b24queue.errors import EXIT_OK
from b24queue.secrets import redaction
from b24queue.settings import Settings
from b24queue.telemetry import logs

log = logging.getLogger(__name__)

# A service: runs until its `stop` event is set, then shuts down and returns.
Service = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def start_logging(settings: Settings) -> None:
    """Before any line is logged or any error kept: the settings' secrets made known to
    redaction, then the log's level and format."""
    redaction.remember(settings.secrets())
    logs.configure(settings.log_level, settings.log_format)


def run(serve: Service) -> int:
    """`serve(stop)` on an event loop of its own, `stop` set by the first signal; the exit code."""

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await serve(stop)

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main())
    return EXIT_OK


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (it is a dependency on Linux and macOS): a faster event loop
    for the ingress and workers; the standard loop elsewhere."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


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


async def until_stopped(
    stop: asyncio.Event,
    failed: Awaitable[BaseException],
    work: Awaitable[None] | None = None,
) -> None:
    """Until `stop` is set, or, given `work` (which ends once `stop` is set), until it ends.
    `failed` returns why the service cannot go on (its publisher gave up for good): if it comes
    first, `work` is stopped, and its error raised once `work` has ended."""
    running = asyncio.ensure_future(stop.wait() if work is None else work)
    failing = asyncio.ensure_future(failed)
    await asyncio.wait({running, failing}, return_when=asyncio.FIRST_COMPLETED)
    if work is None:
        running.cancel()
    elif not running.done():
        stop.set()  # stop the work, then report why
    await asyncio.gather(running, return_exceptions=work is None)
    failing.cancel()
    await asyncio.gather(failing, return_exceptions=True)
    if failing.done() and not failing.cancelled():
        raise failing.result()
