"""A consumer that does nothing: what the benchmarks drain queues with."""

from __future__ import annotations

from b24queue import Event, EventConsumer


class Noop(EventConsumer):
    queue = "bench.sqlite"
    events = ("#",)
    prefetch = 64

    async def handle(self, event: Event) -> None:
        return None
