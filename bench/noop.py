"""A consumer that does nothing: what the benchmarks drain queues with (its queue: BENCH_QUEUE,
or bench.tables). With BENCH_LATENCY_FILE set it notes each event's time from accepted (the
ingress's timestamp; microseconds on SQLite) to handled, and writes p50/p99 there when it stops."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

from b24queue import Event, EventConsumer


class Noop(EventConsumer):
    queue = os.environ.get("BENCH_QUEUE", "bench.tables")
    events = ("#",)
    prefetch = 64

    def __init__(self) -> None:
        self.latencies: list[float] = []
        # Noted only when asked for: a soak runs for minutes, and its memory must be the worker's.
        self.path = os.environ.get("BENCH_LATENCY_FILE")

    async def handle(self, event: Event) -> None:
        if self.path and event.accepted_at is not None:
            self.latencies.append((datetime.now(UTC) - event.accepted_at).total_seconds())

    async def on_stop(self) -> None:
        path = self.path
        if not path or not self.latencies:
            return
        ordered = sorted(self.latencies)
        with open(path, "w") as f:  # noqa: ASYNC230 - once, as the worker stops
            json.dump(
                {
                    "events": len(ordered),
                    "p50_ms": round(ordered[len(ordered) // 2] * 1000, 1),
                    "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 1),
                },
                f,
            )
