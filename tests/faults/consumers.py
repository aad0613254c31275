"""The consumer the fault tests run in real `b24queue worker` processes. Configured by B24QT_*:
QUEUE, RECORD (file: one handled message_id per line, fsync'd), SLEEP_S, PREFETCH,
MAX_DELIVERIES, HANDLE_TIMEOUT_S, HANG_S, MARKERS (a directory).

data[FIELDS][MODE] of an event picks a misbehaviour: `crash` kills the process every time,
`hang-once` hangs for HANG_S on its first delivery only.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from b24queue import Event, EventConsumer

_timeout = os.environ.get("B24QT_HANDLE_TIMEOUT_S", "")


class FaultRecorder(EventConsumer):
    queue = os.environ.get("B24QT_QUEUE", "b24qt.unset")
    events = ("#",)
    prefetch = int(os.environ.get("B24QT_PREFETCH", "16"))
    max_deliveries = int(os.environ.get("B24QT_MAX_DELIVERIES", "20"))
    handle_timeout_s = float(_timeout) if _timeout else None
    retry_delays_s = (0.2, 0.5)
    max_attempts = 10

    async def handle(self, event: Event) -> None:
        fields = event.data.get("FIELDS", {}) if isinstance(event.data, dict) else {}
        mode = fields.get("MODE", "")
        if mode == "crash":
            os._exit(17)  # not an exception: the process dies mid-handler
        if mode == "hang-once":
            marker = Path(os.environ["B24QT_MARKERS"]) / str(event.message_id)
            if not marker.exists():
                marker.touch()
                await asyncio.sleep(float(os.environ.get("B24QT_HANG_S", "0")))
        await asyncio.sleep(float(os.environ.get("B24QT_SLEEP_S", "0")))
        with open(os.environ["B24QT_RECORD"], "a") as f:
            f.write(f"{event.message_id}\n")
            f.flush()
            os.fsync(f.fileno())
        if times := os.environ.get("B24QT_TIMES"):  # when each was handled, for recovery times
            with open(times, "a") as f:
                f.write(f"{event.message_id} {time.time():.3f}\n")
