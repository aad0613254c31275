"""The dead-letter tools against the real broker: purge deletes exactly what the operator was
shown, and list / replay hold no messages in the client, whatever the size of the DLQ."""

from __future__ import annotations

import asyncio
import gc
import os
import pty
import sys
import weakref
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.queue
import pytest

from b24queue import Event, EventConsumer
from b24queue.settings import Settings
from b24queue.transports.amqp.dlq import DeadLetterTool
from b24queue.worker import declare_topology
from tests.support.rabbitmq import Broker, cli_env
from tests.support.wait import wait_until

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.broker


class DealSync(EventConsumer):
    events = ("ONCRMDEALADD",)

    async def handle(self, event: Event) -> None:
        return None


async def dlq_of(broker: Broker, suffix: str, settings: Settings | None = None) -> tuple[str, str]:
    """(consumer queue, its DLQ), declared with nobody consuming."""
    cls = type("Ops", (DealSync,), {"queue": broker.name(suffix)})
    await declare_topology(settings or broker.settings, [cls])
    return cls.queue, f"{cls.queue}.dlq"


async def publish(broker: Broker, queue: str, ids: list[str], body_bytes: int = 100) -> None:
    # The fixture's channels confirm each publish: the messages are in the queue on return.
    async with broker.connection.channel() as channel:
        for message_id in ids:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    b"x" * body_bytes,
                    message_id=message_id,
                    type="ONCRMDEALADD",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=queue,
            )


async def ids_in(broker: Broker, queue: str, expect: int | None = None) -> list[str]:
    """The message ids in a queue, in order; taken out. With `expect`, once the queue holds that
    many: a quorum queue puts back what a closed channel held through its Raft log, after the
    channel's Close-Ok, so right after the tool closes its depth can still be short (seen on a busy
    broker: the test read fewer than it had put back)."""
    if expect is not None:

        async def refilled() -> bool:
            return await broker.depth(queue) >= expect

        await wait_until(refilled, 30, f"{expect} messages back in {queue}")
    depth = await broker.depth(queue)
    return [m.message_id or "" for m in await broker.take(queue, depth)] if depth else []


def back_in_place(queue_type: str, ids: list[str], found: list[str]) -> bool:
    """All back; in order too on a classic queue. A quorum queue (RabbitMQ 3.10) returns held
    messages in hash order once there are more than a few: see b24queue.transports.amqp.dlq."""
    return found == ids if queue_type == "classic" else sorted(found) == sorted(ids)


async def test_purge_deletes_what_was_counted_and_keeps_what_came_after(broker: Broker) -> None:
    queue, dlq = await dlq_of(broker, "purge-exact")
    shown = [f"shown-{i}" for i in range(3)]
    await publish(broker, dlq, shown)
    # A terminal to answer the prompt on, as an operator would.
    master, terminal = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "b24queue",
            "dlq",
            "purge",
            queue,
            cwd=ROOT,
            env=cli_env(broker),
            stdin=terminal,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        os.close(terminal)
        assert proc.stdout is not None
        prompt = await asyncio.wait_for(proc.stdout.readuntil(b"[y/N] "), timeout=60)
        assert f"Delete the 3 message(s) now in {dlq}".encode() in prompt
        later = [f"later-{i}" for i in range(2)]
        await publish(broker, dlq, later)  # dead letters keep coming while the operator reads
        os.write(master, b"y\n")
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        os.close(master)
    text = out.decode()
    assert proc.returncode == 0, text
    assert f"purged 3 message(s) from {dlq}" in text
    assert "kept 2 message(s) that arrived after the count" in text
    assert await ids_in(broker, dlq) == later


async def test_purge_stops_at_an_empty_queue(broker: Broker) -> None:
    _, dlq = await dlq_of(broker, "purge-short")
    await publish(broker, dlq, ["a", "b"])
    async with DeadLetterTool(broker.settings, dlq) as tool:
        assert await tool.purge(5) == 2  # someone took the rest since the count
    assert await broker.depth(dlq) == 0


class HeldMessages:
    """Tracks every message aio-pika hands the tool (body and all) by weak reference, to see how
    many the tool still holds at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.alive: weakref.WeakSet[Any] = weakref.WeakSet()
        self.fetched = 0
        self.most_held = 0
        tracker = self

        class Tracked(aio_pika.IncomingMessage):
            __slots__ = ("__weakref__",)

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                tracker.fetched += 1
                tracker.alive.add(self)
                if len(tracker.alive) > 2:
                    gc.collect()  # unreachable (cyclic) garbage is not held
                tracker.most_held = max(tracker.most_held, len(tracker.alive))

        # Queue.get builds its messages from this module-level name.
        monkeypatch.setattr(aio_pika.queue, "IncomingMessage", Tracked)


# The one being looked at and the previous one, not yet dropped while the next is fetched.
MOST_HELD = 2


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_list_keeps_no_message_beyond_what_it_shows(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, queue_type: str
) -> None:
    _, dlq = await dlq_of(broker, "list-big", broker.make_settings(queue_type=queue_type))
    ids = [f"m-{i:03}" for i in range(300)]
    await publish(broker, dlq, ids, body_bytes=4096)
    with monkeypatch.context() as patch:
        held = HeldMessages(patch)
        async with DeadLetterTool(broker.settings, dlq) as tool:
            total, letters = await tool.list(limit=5)
    assert (total, [x.message_id for x in letters]) == (300, ids[:5])
    assert {x.size_bytes for x in letters} == {4096}
    assert held.fetched == 300  # every message was taken and held (by the broker) ...
    assert held.most_held <= MOST_HELD  # ... none kept by the tool
    assert back_in_place(queue_type, ids, await ids_in(broker, dlq, len(ids)))


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_replay_by_id_keeps_no_message_it_passes_over(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, queue_type: str
) -> None:
    settings = broker.make_settings(queue_type=queue_type)
    queue, dlq = await dlq_of(broker, "replay-big", settings)
    ids = [f"m-{i:03}" for i in range(300)]
    await publish(broker, dlq, ids, body_bytes=4096)
    wanted = {ids[10], ids[250]}
    with monkeypatch.context() as patch:
        held = HeldMessages(patch)
        async with DeadLetterTool(broker.settings, dlq) as tool:
            assert await tool.replay(ids=set(wanted)) == (2, 300)
    assert held.fetched == 300
    assert held.most_held <= MOST_HELD
    kept = [i for i in ids if i not in wanted]
    assert back_in_place(queue_type, kept, await ids_in(broker, dlq, len(kept)))
    assert {m.message_id for m in await broker.take(queue, 2)} == wanted
