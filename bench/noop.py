"""A consumer that does nothing: what the benchmarks drain queues with (its queue: BENCH_QUEUE,
or bench.tables). With BENCH_LATENCY_FILE set it notes each event's time from accepted (the
ingress's timestamp; microseconds on SQLite) to handled, and writes p50/p99 there when it stops.
With BENCH_HANDLER_S set each handler then sleeps that long (bench.trickle: 0.02)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime

from b24queue import Event, EventConsumer


class Noop(EventConsumer):
    queue = os.environ.get("BENCH_QUEUE", "bench.tables")
    events = ("#",)
    prefetch = 64

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.started = time.monotonic()
        self.windows: dict[int, float] = {}  # the worst latency of each 10 s since the start
        # Noted only when asked for: a soak runs for minutes, and its memory must be the worker's.
        self.path = os.environ.get("BENCH_LATENCY_FILE")
        self.sleep_s = float(os.environ.get("BENCH_HANDLER_S", "0"))

    async def handle(self, event: Event) -> None:
        if self.path and event.accepted_at is not None:
            latency = (datetime.now(UTC) - event.accepted_at).total_seconds()
            self.latencies.append(latency)
            window = int((time.monotonic() - self.started) // 10)
            self.windows[window] = max(self.windows.get(window, 0.0), latency)
        if self.sleep_s:
            await asyncio.sleep(self.sleep_s)

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
                    "max_ms": round(ordered[-1] * 1000, 1),
                    "max_ms_by_10s": [round(self.windows[w] * 1000) for w in sorted(self.windows)],
                },
                f,
            )
