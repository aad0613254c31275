"""The ingress's sink on the embedded queue: `publish` returns once the event's rows are committed
(there is no connection to lose: the database is on the ingress's own disk)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from b24queue.errors import BrokerUnavailableError
from b24queue.events.envelope import Envelope
from b24queue.settings import Settings
from b24queue.transports.kit.unrouted import UnroutedCap
from b24queue.transports.sqlite import queue as q
from b24queue.transports.sqlite.db import Database, notify

log = logging.getLogger(__name__)


class SqlitePublisher:
    """The ingress's sink: returns once the event's rows are committed."""

    def __init__(self, settings: Settings, path: Path) -> None:
        self._settings = settings
        self._db = Database(path)
        self.unrouted = UnroutedCap(settings)

    async def __aenter__(self) -> SqlitePublisher:
        await self._db.__aenter__()
        unrouted = self._settings.unrouted
        await self._db.write(lambda db: q.declare_unrouted(db, unrouted))
        log.info("publishing to %s (sqlite)", self._db.path)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._db.__aexit__()

    def is_ready(self) -> bool:
        return True

    async def failed(self) -> BaseException:
        await asyncio.get_running_loop().create_future()  # never: there is no connection to lose
        raise AssertionError("unreachable")

    async def publish(self, envelope: Envelope) -> None:
        unrouted, timeout_s = self._settings.unrouted, self._settings.publish_timeout_s
        cap = self.unrouted
        try:
            async with asyncio.timeout(timeout_s):
                dropped = await self._db.write(lambda db: q.publish(db, [envelope], unrouted, cap))
        except TimeoutError:
            # The write may still commit: the event is then there, and answered 503 (at least
            # once; Bitrix24 does not resend it, nothing is lost).
            raise BrokerUnavailableError(
                f"the queue database did not commit within {timeout_s:g}s"
            ) from None
        except Exception as exc:  # a full disk, a lock held too long
            raise BrokerUnavailableError(f"the queue database refused the write: {exc!r}") from None
        cap.dropped(*dropped)
        notify(self._db.path)
