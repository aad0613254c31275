"""Consumers for tests that run a real `b24queue worker` subprocess.

Configured by B24QT_* variables (not B24QUEUE_*, which settings would refuse as unknown):
B24QT_QUEUE, B24QT_RECORD (a file: one line per start/done), B24QT_SLEEP_S, B24QT_PREFETCH.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import ClassVar

from b24queue import Event, EventConsumer


def _record(line: str) -> None:
    with open(os.environ["B24QT_RECORD"], "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


class Recorder(EventConsumer):
    queue = os.environ.get("B24QT_QUEUE", "b24qt.unset")
    events = ("#",)
    prefetch = int(os.environ.get("B24QT_PREFETCH", "8"))
    handle_timeout_s = float(os.environ.get("B24QT_HANDLE_TIMEOUT_S", "1500"))

    async def handle(self, event: Event) -> None:
        _record(f"start {event.message_id} {int(event.redelivered)}")
        await asyncio.sleep(float(os.environ.get("B24QT_SLEEP_S", "0")))
        _record(f"done {event.message_id} {int(event.redelivered)}")


class Narrowing(EventConsumer):
    """A consumer whose events come from B24QT_EVENTS (comma-separated): a deploy that changes
    them, for the stale-binding tests."""

    queue = os.environ.get("B24QT_QUEUE", "b24qt.unset")
    events = tuple(os.environ.get("B24QT_EVENTS", "ONX").split(","))

    async def handle(self, event: Event) -> None:
        return None


class SlowFirst(Recorder):
    """A Recorder whose first event in the process takes B24QT_SLEEP_S and the others no time:
    later events finish before an earlier one (out-of-order completion)."""

    first = True

    async def handle(self, event: Event) -> None:
        slow, SlowFirst.first = SlowFirst.first, False
        _record(f"start {event.message_id} {int(event.redelivered)}")
        await asyncio.sleep(float(os.environ.get("B24QT_SLEEP_S", "0")) if slow else 0)
        _record(f"done {event.message_id} {int(event.redelivered)}")


class Crasher(Recorder):
    """Notes the delivery, then kills its own process (SIGKILL) on every event: an event that
    crashes its worker each time (B24QT_MAX_DELIVERIES bounds how often it is delivered)."""

    max_deliveries = int(os.environ.get("B24QT_MAX_DELIVERIES", "20"))

    async def handle(self, event: Event) -> None:
        _record(f"start {event.message_id} {int(event.redelivered)}")
        os.kill(os.getpid(), signal.SIGKILL)


class KillsOnUpdate(Recorder):
    """Records every event; an ONCRMDEALUPDATE kills its own process (SIGKILL) once the file
    B24QT_GO exists (the test creates it when it has seen what it waits for): one poison event
    among events that are handled."""

    max_deliveries = int(os.environ.get("B24QT_MAX_DELIVERIES", "20"))

    async def handle(self, event: Event) -> None:
        if event.name != "ONCRMDEALUPDATE":
            return await super().handle(event)
        _record(f"start {event.message_id} {int(event.redelivered)}")
        while not os.path.exists(os.environ["B24QT_GO"]):
            await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)


class RecordsAdds(Recorder):
    """A Recorder bound to deal additions only."""

    events = ("ONCRMDEALADD",)


class SlowFirstPerPortal(Recorder):
    """A Recorder whose first event of each portal (member_id) in the process takes B24QT_SLEEP_S
    and the others no time: every partition holding a portal's events has a slow one open."""

    portals: ClassVar[set[str]] = set()

    async def handle(self, event: Event) -> None:
        member = event.auth.member_id or ""
        slow = member not in SlowFirstPerPortal.portals
        SlowFirstPerPortal.portals.add(member)
        _record(f"start {event.message_id} {int(event.redelivered)}")
        await asyncio.sleep(float(os.environ.get("B24QT_SLEEP_S", "0")) if slow else 0)
        _record(f"done {event.message_id} {int(event.redelivered)}")
