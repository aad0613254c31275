"""What a publish from a handler costs (issue 32), beside the ingress's publish, in one run on one
transport (SQLite by default, or --broker-url), one process:

- ingress: `envelope_for` + the publisher's confirmed `publish` of N events, one at a time and
  N at once (as concurrent requests do), CPU per event;
- worker: N events handled by a consumer that publishes nothing, then N by one that publishes one
  message each (`self.publish`, released before the ack); the difference in CPU per event is
  the publish's.

    .venv/bin/python -m bench.publish_cost [--count 3000] [--broker-url amqp://...]

On a server (--broker-url) its queues and exchanges stay, named `bench<hex>.*` (printed): delete
them after. The handlers' messages go to the unrouted queue (nobody binds them).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from b24queue import Event, EventConsumer
from b24queue.events.envelope import envelope_for
from b24queue.publishing import when_ready
from b24queue.settings import Settings, load_settings
from b24queue.testing import make_event
from b24queue.transports import connection_name, transport_for
from b24queue.worker import Worker


def consumer(
    queue: str, publishes: bool, done: list[int], count: int, all_done: asyncio.Event
) -> type[EventConsumer]:
    async def handle(self: EventConsumer, event: Event) -> None:
        if publishes:
            await self.publish("APP.BENCH.NEXT", {"id": event.data["FIELDS"]["ID"]})
        done[0] += 1
        if done[0] == count:
            all_done.set()

    attrs = {"queue": queue, "events": ("ONCRMDEALADD",), "handle": handle, "prefetch": 64}
    attrs["fair_share"] = False  # one queue on every transport (no RabbitMQ shards)
    return type(f"Bench_{publishes}", (EventConsumer,), attrs)


def events(count: int) -> list[Event]:
    return [make_event("ONCRMDEALADD", {"FIELDS": {"ID": str(i)}}) for i in range(count)]


async def ingress(settings: Settings, count: int, concurrent: bool) -> float:
    """CPU seconds per event of envelope_for + a confirmed publish."""
    batch = events(count)
    async with transport_for(settings).publisher(connection_name("bench")) as publisher:
        await when_ready(publisher, 30)
        cpu = time.process_time()
        if concurrent:
            await asyncio.gather(*(publisher.publish(envelope_for(e)) for e in batch))
        else:
            for event in batch:
                await publisher.publish(envelope_for(event))
        return (time.process_time() - cpu) / count


async def worker(settings: Settings, count: int, publishes: bool) -> tuple[float, float]:
    """(CPU seconds per event, wall seconds) for `count` events handled."""
    done, all_done = [0], asyncio.Event()
    queue = f"{settings.exchange.removesuffix('.events')}.q{int(publishes)}"
    cls = consumer(queue, publishes, done, count, all_done)
    await transport_for(settings).declare([cls])
    async with transport_for(settings).publisher(connection_name("bench")) as publisher:
        await when_ready(publisher, 30)
        await asyncio.gather(*(publisher.publish(envelope_for(e)) for e in events(count)))
    cpu, wall = time.process_time(), time.perf_counter()
    async with Worker(settings, [cls]):
        await all_done.wait()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / count, wall


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--broker-url", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.broker_url or f"sqlite:{Path(tmp) / 'queue.sqlite3'}"
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        settings = load_settings(
            broker_url=url, exchange=f"{prefix}.events", unrouted=f"{prefix}.unrouted"
        )
        n = args.count
        one = await ingress(settings, n, concurrent=False)
        many = await ingress(settings, n, concurrent=True)
        plain, plain_wall = await worker(settings, n, publishes=False)
        publishing, pub_wall = await worker(settings, n, publishes=True)
        print(f"transport {transport_for(settings).name}, {n} events each; left: {prefix}.*")
        print(f"ingress publish, one at a time:   {one * 1e6:8.0f} us CPU/event")
        print(f"ingress publish, {n} at once:  {many * 1e6:8.0f} us CPU/event")
        print(f"worker, handler publishes nothing: {plain * 1e6:8.0f} us CPU/event ", end="")
        print(f"({plain_wall:.1f} s)")
        print(f"worker, handler publishes one:     {publishing * 1e6:8.0f} us CPU/event ", end="")
        print(f"({pub_wall:.1f} s)")
        print(
            f"a publish from a handler:          {(publishing - plain) * 1e6:8.0f} us CPU/message"
        )


if __name__ == "__main__":
    asyncio.run(main())
