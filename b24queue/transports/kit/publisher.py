"""The ingress's publisher on a server that can be away: it connects in the background, so the
ingress starts (and answers 503, or spools) while the server is down, and recovers without a
restart when it comes back. Each transport's publisher is one of these; what differs is how it
connects, how it notices a loss and what it closes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Self, TypeVar

from b24queue.errors import B24QueueError, BrokerUnavailableError
from b24queue.events.envelope import Envelope
from b24queue.settings import Settings
from b24queue.transports.kit.batching import Batcher
from b24queue.transports.kit.unrouted import UnroutedCap

log = logging.getLogger(__name__)
T = TypeVar("T")


async def given_up(task: asyncio.Task[None] | None) -> BaseException:
    """`Publisher.failed` for a publisher whose background task keeps it connected: return the
    error (ours, a `B24QueueError`: bad credentials, a newer schema) that ended the task for good;
    wait forever while it runs, since it reconnects by itself."""
    assert task is not None, "use the publisher as `async with`"
    try:
        await asyncio.shield(task)
    except B24QueueError as exc:
        return exc
    await asyncio.get_running_loop().create_future()  # wait forever (until cancelled)
    raise AssertionError("unreachable")


class ReconnectingPublisher:
    """The shape shared by every publisher that keeps a connection in the background.

    `__aenter__` starts `_keep` (connect, and again whenever the connection is lost); `failed`
    returns the error that ended it for good; `breaks` counts the connections lost (the spool's
    forwarder tells an event that breaks the connection every time by it); `__aexit__` stops the
    background task first, then `_close` releases the rest, in the transport's order."""

    server = "the server"  # for the log and errors: "PostgreSQL", "Redis"...

    def __init__(self, settings: Settings, name: str) -> None:
        self._settings = settings
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._ready = False
        self.breaks = 0
        self.unrouted = UnroutedCap(settings)

    async def __aenter__(self) -> Self:
        self._open()
        name = f"b24queue-{self.server.lower()}-publisher"
        self._task = asyncio.create_task(self._keep(), name=name)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close()

    def _open(self) -> None:
        """What runs beside the background task (a group commit's loop)."""

    async def _keep(self) -> None:
        """Connect, and keep connected; returns only by raising an error of ours."""
        raise NotImplementedError

    async def _close(self) -> None:
        """Release what the publisher holds, once the background task has stopped."""

    async def failed(self) -> BaseException:
        return await given_up(self._task)

    def is_ready(self) -> bool:
        raise NotImplementedError

    async def _until_up(self, connect: Callable[[], Awaitable[T]], what: str = "") -> T:
        """`connect()` again every `reconnect_interval_s` until it succeeds. An error of ours
        other than the server being away (credentials, a newer schema, a topology that differs)
        is not transient: it ends the background task, and `failed` reports it."""
        while True:
            try:
                return await connect()
            except B24QueueError as exc:
                if not isinstance(exc, BrokerUnavailableError):
                    raise
                log.warning("%s; retrying", exc)
            except Exception as exc:  # anything else on the way in: the server is not ready
                log.warning("%s not ready (%r); retrying", what or self.server, exc)
            await asyncio.sleep(self._settings.reconnect_interval_s)

    async def _in_time(self, sent: Awaitable[T], verb: str) -> T:
        """`sent` within `publish_timeout_s`, else `BrokerUnavailableError` (the event may still
        arrive: then it is there and was answered 503, at least once; nothing is lost)."""
        timeout_s = self._settings.publish_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await sent
        except TimeoutError:
            raise BrokerUnavailableError(
                f"{self.server} did not {verb} within {timeout_s:g}s"
            ) from None

    def _lost(self) -> None:
        """A failure showed the connection lost: not ready, and a break counted (once, until
        it is ready again)."""
        if self._ready:
            self.breaks += 1
        self._ready = False


class GroupCommitPublisher(ReconnectingPublisher):
    """A publisher on a server that commits what one statement or script holds at once: every
    event goes into the next group commit (`batching`), `_write` one batch."""

    lost: tuple[type[BaseException], ...] = (ConnectionError,)  # the connection is gone

    def __init__(self, settings: Settings, name: str) -> None:
        super().__init__(settings, name)
        self._batches: Batcher[Envelope, None] = Batcher(
            self._write, f"b24queue-{self.server.lower()}-publish", self.lost
        )

    def _open(self) -> None:
        self._batches.start()

    async def _close(self) -> None:
        await self._batches.stop()
        await self._disconnect()

    async def _disconnect(self) -> None:
        """Close the connection, once no batch is written any more."""

    async def _write(self, envelopes: list[Envelope]) -> list[None]:
        """One statement or script, one commit, for all of these."""
        raise NotImplementedError

    async def _committed(self, envelope: Envelope, verb: str) -> None:
        """`envelope` in the next group commit, within `publish_timeout_s`."""
        if not self.is_ready():
            raise BrokerUnavailableError(f"not connected to {self.server}")
        await self._in_time(self._batches.submit(envelope), verb)
