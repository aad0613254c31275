"""`b24queue offline` whose portal clients reach the fake portal:
`python -m tests.support.offline_puller`.

The product's `serve_offline` (settings from B24QUEUE_*, the transport, signals, the event loop),
given the fake portal's resolver (B24QT_PORTAL_PORT: where the fake listens) instead of DNS.
"""

from __future__ import annotations

import asyncio
import os
import sys

from b24queue import process
from b24queue.offline.process import serve_offline
from b24queue.settings import Settings, load_settings
from tests.support.fake_portal import StaticResolver


async def main(settings: Settings, stop: asyncio.Event) -> None:
    resolver = StaticResolver(ports={443: int(os.environ["B24QT_PORTAL_PORT"])})
    await serve_offline(settings, stop, resolver=resolver)


if __name__ == "__main__":
    settings = load_settings()
    process.start_logging(settings)
    sys.exit(process.run(lambda stop: main(settings, stop)))
