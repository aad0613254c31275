"""The Redis idempotency store against the machine's real Redis."""

from __future__ import annotations

import uuid

import pytest

from b24queue import Event, EventConsumer
from b24queue.idempotency import RedisSeenStore
from b24queue.testing import make_event, run_handler

pytestmark = pytest.mark.broker


async def test_two_workers_sharing_redis_handle_a_message_id_once() -> None:
    prefix = f"b24queue-test:{uuid.uuid4().hex}:"
    store_a = RedisSeenStore("redis://127.0.0.1:6379/0", ttl_s=60, prefix=prefix)
    store_b = RedisSeenStore("redis://127.0.0.1:6379/0", ttl_s=60, prefix=prefix)
    calls: list[str] = []

    async def handle(self: EventConsumer, event: Event) -> None:
        calls.append(event.message_id or "")

    a = type(
        "A",
        (EventConsumer,),
        {"queue": "deals", "events": ("#",), "handle": handle, "idempotency": store_a},
    )
    b = type(
        "B",
        (EventConsumer,),
        {"queue": "deals", "events": ("#",), "handle": handle, "idempotency": store_b},
    )
    try:
        first = await run_handler(a(), make_event("ONX"), message_id="dup-1")
        second = await run_handler(b(), make_event("ONX"), message_id="dup-1")
        other = await run_handler(b(), make_event("ONX"), message_id="dup-2")
        assert first.acked and second.reason == "duplicate" and other.acked
        assert calls == ["dup-1", "dup-2"]
        ttl = await store_a._redis().ttl(prefix + "deals:dup-1")
        assert 0 < ttl <= 60
    finally:
        await store_a._redis().delete(prefix + "deals:dup-1", prefix + "deals:dup-2")
        await store_a.close()
        await store_b.close()
