"""A worker process whose portal clients reach the fake portal:
`python -m tests.support.portal_worker`.

`b24queue worker` resolves portal names with DNS; the fake portal is on loopback behind a
self-signed certificate, so this entry builds the same `Worker` with `PortalClients` given the
fake's resolver (B24QT_PORTAL_PORT: where the fake listens). Everything else is the product's:
settings from B24QUEUE_*, the transport, signals. Its consumer, `DealReader`, reads the deal
each event names through `self.portal(event)` and writes one line per deal read to B24QT_RECORD.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from b24queue import Event, EventConsumer, process
from b24queue.portal.clients import PortalClients
from b24queue.settings import Settings, load_settings
from b24queue.worker import Worker
from tests.support.fake_portal import StaticResolver


class DealReader(EventConsumer):
    queue = os.environ.get("B24QT_QUEUE", "b24qt.unset")
    events = ("ONCRMDEALUPDATE",)
    prefetch = 64
    retry_delays_s = (0.5,)

    async def handle(self, event: Event) -> None:
        deal_id = event.data["FIELDS"]["ID"]
        deal = await self.portal(event).call("crm.deal.get", {"id": deal_id})
        with open(os.environ["B24QT_RECORD"], "a") as f:
            f.write(f"{deal['ID']} {os.getpid()}\n")


async def main(settings: Settings, stop: asyncio.Event) -> None:
    resolver = StaticResolver(ports={443: int(os.environ["B24QT_PORTAL_PORT"])})
    async with (
        PortalClients(settings, resolver=resolver) as portals,
        Worker(settings, [DealReader], portals=portals),
    ):
        await stop.wait()
    logging.getLogger(__name__).info("refreshes made here: %d", portals.refresher.refreshes)


if __name__ == "__main__":
    settings = load_settings()
    process.start_logging(settings)
    sys.exit(process.run(lambda stop: main(settings, stop)))
