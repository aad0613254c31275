"""A worker process with a robot consumer whose portal clients reach the fake portal:
`python -m tests.support.robot_worker` (as tests.support.portal_worker, for robots). Its robot,
`greet`, writes one line per handler run to B24QT_RECORD and returns {"greeting": ...}; the
worker sends that with bizproc.event.send."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from typing import Any

from b24queue import Event, Property, Robot, RobotConsumer, call_of, process
from b24queue.portal.clients import PortalClients
from b24queue.settings import Settings, load_settings
from b24queue.worker import Worker
from tests.support.fake_portal import StaticResolver

GREET = Robot(
    code="greet",
    name="Greet",
    properties={"who": Property(name="Who", required=True)},
    return_properties={"greeting": Property(name="Greeting")},
)


class Greeter(RobotConsumer):
    queue = os.environ.get("B24QT_QUEUE", "b24qt.robots")
    bizproc = GREET
    handle_timeout_s = 1.0  # its lease: 6 s (a killed worker's call comes back that soon)
    retry_delays_s = (0.1,)

    async def handle(self, event: Event) -> Mapping[str, Any]:
        who = call_of(event).properties["who"]
        with open(os.environ["B24QT_RECORD"], "a") as f:
            f.write(f"{who} {os.getpid()}\n")
        return {"greeting": f"Hello, {who}"}


async def main(settings: Settings, stop: asyncio.Event) -> None:
    resolver = StaticResolver(ports={443: int(os.environ["B24QT_PORTAL_PORT"])})
    async with (
        PortalClients(settings, resolver=resolver) as portals,
        Worker(settings, [Greeter], portals=portals),
    ):
        await stop.wait()


if __name__ == "__main__":
    settings = load_settings()
    process.start_logging(settings)
    sys.exit(process.run(lambda stop: main(settings, stop)))
