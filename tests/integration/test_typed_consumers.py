"""A typed consumer in a real worker, on the SQLite transport: the handler gets its model, and
an event that does not fit goes to the DLQ on its first attempt, its reason and error there for
`dlq list`."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from b24queue import EventConsumer
from b24queue.events.envelope import envelope_for
from b24queue.events.typed import DealUpdated
from b24queue.settings import load_settings
from b24queue.testing import make_event
from b24queue.transports import transport_for
from b24queue.worker import Worker
from tests.support.wait import wait_until


class DealChanges(EventConsumer[DealUpdated]):
    queue = "typed-deal-changes"
    events = ("ONCRMDEALUPDATE",)
    max_attempts = 5
    handled: ClassVar[list[tuple[str, int]]] = []  # the worker makes its own instance

    async def handle(self, event: DealUpdated) -> None:
        self.handled.append((event.id, event.attempt))


async def test_a_typed_consumer_in_a_worker(tmp_path: Path) -> None:
    settings = load_settings(
        broker_url=f"sqlite:{tmp_path / 'queue.sqlite3'}", sqlite_poll_s=0.02, shutdown_timeout_s=2
    )
    async with Worker(settings, [DealChanges]):
        async with transport_for(settings).publisher("test") as sink:
            for data in ({"FIELDS": {"ID": "7"}}, {"FIELDS": {"TITLE": "no id"}}):
                await sink.publish(envelope_for(make_event("ONCRMDEALUPDATE", data)))
        async with transport_for(settings).dead_letters(DealChanges.queue) as dlq:
            await wait_until(lambda: DealChanges.handled == [("7", 1)], 10, "the deal handled")

            async def dead_lettered() -> bool:
                return await dlq.count() == 1

            await wait_until(dead_lettered, 10, "the event without an id dead-lettered")
            _, letters = await dlq.list(5)
    (letter,) = letters
    assert (letter.reason, letter.attempts) == ("model_mismatch", 1)
    assert letter.error == "ModelMismatchError: not DealUpdated: data[FIELDS][ID]: is required"
    assert DealChanges.handled == [("7", 1)]
