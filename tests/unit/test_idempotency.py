from __future__ import annotations

from typing import ClassVar

from b24queue import Event, EventConsumer
from b24queue.idempotency import MemorySeenStore, SeenStore
from b24queue.testing import make_event, run_handler


class Counting(EventConsumer):
    queue = "counting"
    events = ("#",)
    idempotency: ClassVar[SeenStore | None] = MemorySeenStore(max_items=2)
    calls: ClassVar[list[str]] = []
    fail: ClassVar[bool] = False

    async def handle(self, event: Event) -> None:
        self.calls.append(event.message_id or "")
        if self.fail:
            raise RuntimeError("not this time")


async def test_a_handled_message_id_is_acked_without_running_again() -> None:
    Counting.calls.clear()
    event = make_event("ONX")
    first = await run_handler(Counting(), event, message_id="m1")
    second = await run_handler(Counting(), event, message_id="m1", attempt=1)
    assert first.acked and second.acked
    assert second.reason == "duplicate"
    assert Counting.calls == ["m1"]


async def test_a_failed_attempt_is_not_remembered() -> None:
    Counting.calls.clear()
    Counting.fail = True
    try:
        assert (await run_handler(Counting(), make_event("ONX"), message_id="m2")).retried
    finally:
        Counting.fail = False
    assert (await run_handler(Counting(), make_event("ONX"), message_id="m2", attempt=2)).acked
    assert Counting.calls == ["m2", "m2"]


async def test_memory_store_is_bounded() -> None:
    store = MemorySeenStore(max_items=2)
    for key in ("a", "b", "c"):
        await store.remember(key)
    assert [await store.seen(k) for k in ("a", "b", "c")] == [False, True, True]


class BrokenStore:
    async def seen(self, key: str) -> bool:
        raise ConnectionError("redis down")

    async def remember(self, key: str) -> None:
        raise ConnectionError("redis down")


async def test_a_store_outage_does_not_stop_delivery() -> None:
    class Guarded(EventConsumer):
        queue = "guarded"
        events = ("#",)
        idempotency = BrokenStore()

        async def handle(self, event: Event) -> None:
            return None

    assert (await run_handler(Guarded(), make_event("ONX"), message_id="m3")).acked
