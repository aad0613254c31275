"""A no-op consumer for the soak run: `b24queue worker bench.noop:NoOp` (queue from BENCH_QUEUE)."""

from __future__ import annotations

import os

from b24queue import Event, EventConsumer


class NoOp(EventConsumer):
    queue = os.environ.get("BENCH_QUEUE", "bench.noop")
    events = ("#",)
    prefetch = 64

    async def handle(self, event: Event) -> None:
        return None
