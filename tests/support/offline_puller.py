"""`b24queue offline` whose portal clients reach the fake portal:
`python -m tests.support.offline_puller`.

The product's `serve_offline` (settings from B24QUEUE_*, the transport, signals), given the fake
portal's resolver (B24QT_PORTAL_PORT: where the fake listens) instead of DNS.
"""

from __future__ import annotations

import asyncio
import os

from b24queue.logs import configure
from b24queue.offline.process import serve_offline
from b24queue.runtime import install_signal_handlers
from b24queue.settings import load_settings
from tests.support.fake_portal import StaticResolver


async def main() -> None:
    settings = load_settings()
    stop = asyncio.Event()
    install_signal_handlers(stop)
    resolver = StaticResolver(ports={443: int(os.environ["B24QT_PORTAL_PORT"])})
    await serve_offline(settings, stop, resolver=resolver)


if __name__ == "__main__":
    configure("INFO")
    asyncio.run(main())
