"""Consumers for tests: a class made on the spot for a test's own queue (`consumer`), and the
classes a real `b24queue worker` subprocess runs (`b24queue worker tests.support.consumers:X`).

Those are configured by B24QT_* variables (not B24QUEUE_*, which settings would refuse as
unknown): B24QT_QUEUE, B24QT_RECORD (a file: one line per start/done, read by `record_starts`
and `record_done`), B24QT_SLEEP_S, B24QT_PREFETCH. `FaultRecorder` is the fault suite's: see it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

from b24queue import Event, EventConsumer, Retry

Handle = Callable[[EventConsumer, Event], Awaitable[None]]


def consumer(
    queue: str, events: tuple[str, ...], handle: Handle, **attrs: Any
) -> type[EventConsumer]:
    """A consumer class of `queue`, bound to `events`, whose `handle` is the one given."""
    body: dict[str, Any] = {"queue": queue, "events": events, "handle": handle, **attrs}
    return type(f"C_{queue.replace('.', '_').replace('-', '_')}", (EventConsumer,), body)


def record_starts(record: Path) -> list[tuple[str, str]]:
    """(message_id, redelivered flag) of every handler start a worker wrote to `record`."""
    if not record.exists():
        return []
    return [
        (parts[1], parts[2])
        for parts in (ln.split() for ln in record.read_text().splitlines())
        if parts[0] == "start"
    ]


def record_done(record: Path) -> set[str]:
    """The message_ids whose handler finished, as a worker wrote them to `record`."""
    if not record.exists():
        return set()
    return {ln.split()[1] for ln in record.read_text().splitlines() if ln.startswith("done ")}


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
    fair_share = os.environ.get("B24QT_FAIR", "1") == "1"

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


_timeout = os.environ.get("B24QT_HANDLE_TIMEOUT_S", "")


class FaultRecorder(EventConsumer):
    """The fault suite's consumer (tests/faults, tests/cluster). Configured by B24QT_*: QUEUE,
    RECORD (file: one handled message_id per line, fsync'd), SLEEP_S, PREFETCH, MAX_DELIVERIES,
    HANDLE_TIMEOUT_S, HANG_S, MARKERS (a directory), TIMES (a file: when each was handled).

    data[FIELDS][MODE] of an event picks a misbehaviour: `crash` kills the process every time,
    `hang-once` hangs for HANG_S on its first delivery only."""

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


class PortalRecorder(EventConsumer):
    """The fair-share scenarios' consumer (tests/conformance/fairness.py): one line per handler
    start and end, `start|done <member_id or -> <time.time()> <message_id>` (appended, not
    fsync'd: floods are thousands of lines), sleeping B24QT_SLEEP_S between. B24QT_FAIR (1/0),
    B24QT_CAP and B24QT_WEIGHTS (`member=weight,...`) set its fairness."""

    queue = os.environ.get("B24QT_QUEUE", "b24qt.unset")
    events = ("#",)
    prefetch = int(os.environ.get("B24QT_PREFETCH", "8"))
    fair_share = os.environ.get("B24QT_FAIR", "1") == "1"
    max_in_flight_per_portal = int(os.environ["B24QT_CAP"]) if os.environ.get("B24QT_CAP") else None
    portal_weights: ClassVar[dict[str, int]] = {
        k: int(v)
        for k, v in (
            pair.split("=") for pair in os.environ.get("B24QT_WEIGHTS", "").split(",") if pair
        )
    }

    async def handle(self, event: Event) -> None:
        member = event.auth.member_id or "-"
        with open(os.environ["B24QT_RECORD"], "a") as f:
            f.write(f"start {member} {time.time():.6f} {event.message_id}\n")
        await asyncio.sleep(float(os.environ.get("B24QT_SLEEP_S", "0")))
        with open(os.environ["B24QT_RECORD"], "a") as f:
            f.write(f"done {member} {time.time():.6f} {event.message_id}\n")


class OrderRecorder(EventConsumer):
    """The ordering scenarios' consumer (tests/conformance/ordering.py), keyed by
    `data.FIELDS.ID` under the rule B24QT_ORDERING: one line per handler start and end,
    `start|done|fail <key> <time.time()> <seq>` (`data.FIELDS.SEQ`), sleeping B24QT_SLEEP_S
    between; an event whose `data.FIELDS.RETRY` is "1" fails its first attempt (retried 0.4 s
    later). B24QT_COALESCE=1: `coalesce` on, and a line of an event that replaces others ends
    with their message_ids, comma-separated."""

    queue = os.environ.get("B24QT_QUEUE", "b24qt.unset")
    events = ("#",)
    prefetch = int(os.environ.get("B24QT_PREFETCH", "8"))
    retry_delays_s = (0.4,)
    handle_timeout_s = float(os.environ.get("B24QT_HANDLE_TIMEOUT_S", "3"))
    ordering_key = "data.FIELDS.ID"
    ordering = os.environ.get("B24QT_ORDERING", "strict")
    coalesce = os.environ.get("B24QT_COALESCE") == "1"

    async def handle(self, event: Event) -> None:
        fields = event.payload["data"]["FIELDS"]
        line = f"{fields['ID']} {{}} {fields['SEQ']}"
        if event.replaces:  # a fifth field: the message_ids coalesced into it
            line += " " + ",".join(event.replaces)
        with open(os.environ["B24QT_RECORD"], "a") as f:
            f.write("start " + line.format(time.time()) + "\n")
        await asyncio.sleep(float(os.environ.get("B24QT_SLEEP_S", "0")))
        failed = fields.get("RETRY") == "1" and event.attempt == 1
        with open(os.environ["B24QT_RECORD"], "a") as f:
            f.write(("fail " if failed else "done ") + line.format(time.time()) + "\n")
        if failed:
            raise Retry("the scenario's retry in the middle")


class PublishesThenDies(EventConsumer):
    """Publishes `APP.FAULT.DONE` from its handler; in the first process to handle an event
    (no file B24QT_MARKERS/killed yet), kills itself (SIGKILL) once that message is confirmed,
    before the event's ack: the crash between a handler's publish and its ack."""

    queue = os.environ.get("B24QT_QUEUE", "b24qt.unset")
    events = ("ONCRMDEALADD",)
    prefetch = 1
    handle_timeout_s = float(os.environ.get("B24QT_HANDLE_TIMEOUT_S", "1500"))

    async def on_start(self) -> None:
        real = self.outbox_publisher
        assert real is not None
        marker = Path(os.environ["B24QT_MARKERS"]) / "killed"

        class Killing:
            async def publish(self, envelope: Any) -> None:
                await real.publish(envelope)
                if not marker.exists():
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)

            def is_ready(self) -> bool:
                return real.is_ready()

        self.outbox_publisher = Killing()

    async def handle(self, event: Event) -> None:
        _record(f"start {event.message_id} {int(event.redelivered)}")
        await self.publish("APP.FAULT.DONE", {"of": event.message_id})
