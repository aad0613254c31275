"""A fair queue on RabbitMQ (docs/fairness.md): its exchange and shards; a queue made before turns
fair in place with events waiting in it, and back (nothing lost, nothing stranded, nothing
handled twice); `status` counts what waits in the shards; a broker without the consistent-hash
exchange stops the worker at start with one clear line."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from typing import Any

import aio_pika
import aiohttp
import pytest

from b24queue import Event, EventConsumer
from b24queue.errors import ConfigError
from b24queue.events.envelope import Envelope
from b24queue.transports.amqp import layout
from b24queue.worker import Worker
from tests.conformance.fairness import FLOOD, QUIET, envelope, publish
from tests.support.bench import Bench
from tests.support.consumers import consumer
from tests.support.rabbitmq import AMQP_URL, MGMT_URL, run_cli
from tests.support.wait import wait_until

pytestmark = pytest.mark.broker


async def bindings_to(bench: Bench, kind: str, name: str) -> set[str]:
    """Routing keys binding queue (`q`) or exchange (`e`) `name` to the events exchange."""
    url = f"{MGMT_URL}/api/bindings/%2F/e/{bench.settings.exchange}/{kind}/{name}"
    basic = base64.b64encode(b"guest:guest").decode()
    headers = {"Authorization": f"Basic {basic}"}
    async with aiohttp.ClientSession(headers=headers) as session, session.get(url) as resp:
        if resp.status == 404:
            return set()
        resp.raise_for_status()
        return {b["routing_key"] for b in await resp.json()}


async def policy_of(name: str) -> str | None:
    basic = base64.b64encode(b"guest:guest").decode()
    headers = {"Authorization": f"Basic {basic}"}
    url = f"{MGMT_URL}/api/queues/%2F/{name}"
    async with aiohttp.ClientSession(headers=headers) as session, session.get(url) as resp:
        resp.raise_for_status()
        found: str | None = (await resp.json()).get("policy")
        return found


async def waiting(bench: Bench, queue: str) -> dict[str, int]:
    """Messages in the queue and in each shard that exists (passive declares)."""
    out = {}
    connection = await aio_pika.connect(AMQP_URL)
    try:
        for name in [queue, *(f"{queue}.s{i}" for i in range(layout.SHARDS))]:
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                continue
            out[name] = int(declared.declaration_result.message_count or 0)
            await channel.close()
    finally:
        await connection.close()
    return out


def counting(name: str, seen: Counter[str], fair: bool, **attrs: Any) -> type[EventConsumer]:
    async def handle(self: EventConsumer, event: Event) -> None:
        seen[event.message_id or ""] += 1
        await asyncio.sleep(0.001)

    return consumer(name, ("ONCRMDEALADD",), handle, fair_share=fair, prefetch=4, **attrs)


def ids(envelopes: list[Envelope]) -> set[str]:
    return {e.message_id or "" for e in envelopes}


@pytest.mark.long  # 10 s: make faults runs it (make test's ten minutes)
async def test_a_queue_turns_fair_in_place_with_events_waiting_and_back(bench: Bench) -> None:
    queue = bench.name("upgraded")
    seen: Counter[str] = Counter()
    # A queue made before fair queues: bound itself, 300 events waiting in it.
    await bench.transport.declare([counting(queue, seen, fair=False)])
    before = envelope(FLOOD, 250) + envelope(QUIET[0], 50)
    await publish(bench, before)
    assert (await waiting(bench, queue))[queue] == 300

    async with Worker(bench.settings, [counting(queue, seen, fair=True)]):
        # The new way in is bound, the old one is not: what comes now goes to the shards.
        assert await bindings_to(bench, "q", queue) == set()
        assert await bindings_to(bench, "e", queue + ".fair") == {"ONCRMDEALADD"}
        # The shards have the queue's rules (dead-lettering to its DLQ, delivery limit).
        shards_policy = f"b24queue.{queue}.shards"

        async def covered() -> bool:
            return all([await policy_of(f"{queue}.s{i}") == shards_policy for i in (0, 15)])

        await wait_until(covered, 15, "the shards' policy applied")
        during = envelope(QUIET[1], 40)
        await publish(bench, during)
        await wait_until(lambda: set(seen) >= ids(before + during), 60, "all handled")
    assert set(seen.values()) == {1}  # none twice
    assert sum((await waiting(bench, queue)).values()) == 0  # none stranded

    # Events that wait in the shards when fair_share is turned off again are drained by the
    # worker that is fair no more; what comes then goes to the queue itself.
    await bench.transport.declare([counting(queue, seen, fair=True)])
    left = envelope(FLOOD, 100) + envelope(QUIET[0], 20)
    await publish(bench, left)
    assert sum(n for q, n in (await waiting(bench, queue)).items() if q != queue) == 120
    async with Worker(bench.settings, [counting(queue, seen, fair=False)]):
        assert await bindings_to(bench, "q", queue) == {"ONCRMDEALADD"}
        assert await bindings_to(bench, "e", queue + ".fair") == set()
        after = envelope(QUIET[1], 30)
        await publish(bench, after)
        await wait_until(lambda: set(seen) >= ids(left + after), 60, "all handled again")
    assert set(seen.values()) == {1}
    assert sum((await waiting(bench, queue)).values()) == 0
    assert len(seen) == 300 + 40 + 120 + 30


async def test_topology_dry_run_shows_the_way_in_moving_to_the_shards(bench: Bench) -> None:
    queue = bench.name("narrow")
    spec = "tests.support.consumers:Narrowing"
    env = {"B24QT_QUEUE": queue, "B24QT_EVENTS": "ONCRMDEALADD", "B24QT_FAIR": "0"}
    code, out = await run_cli(_Slice(bench), "topology", spec, **env)
    assert code == 0, out
    env["B24QT_FAIR"] = "1"
    code, out = await run_cli(_Slice(bench), "topology", "--dry-run", spec, **env)
    assert code == 0, out
    assert f"queue {queue} (exists)" in out and "- unbind ONCRMDEALADD" in out
    assert f"exchange {queue}.fair (would be created)" in out and "+ bind ONCRMDEALADD" in out
    code, out = await run_cli(_Slice(bench), "topology", spec, **env)
    assert code == 0, out
    assert await bindings_to(bench, "e", queue + ".fair") == {"ONCRMDEALADD"}
    assert await bindings_to(bench, "q", queue) == set()
    code, out = await run_cli(_Slice(bench), "topology", "--dry-run", spec, **env)
    assert out.count("bindings up to date") == 2, out


class _Slice:
    """What `run_cli` reads of a broker slice, from a bench."""

    def __init__(self, bench: Bench) -> None:
        self.settings = bench.settings


# 8-9 s: long, run by make faults (make test within its ten minutes).
@pytest.mark.long
async def test_status_counts_what_waits_in_the_shards(bench: Bench) -> None:
    queue = bench.name("counted")
    await bench.transport.declare([counting(queue, Counter(), fair=True)])
    await publish(bench, envelope(FLOOD, 30) + envelope(QUIET[0], 5) + envelope(QUIET[1], 5))

    async def counted() -> bool:
        status = await bench.transport.status()
        rows = [r for r in status.queues if r.queue == queue]
        return len(rows) == 1 and rows[0].ready == 40

    await wait_until(counted, 30, "40 waiting in the row of the queue")
    status = await bench.transport.status()
    assert not [r for r in status.queues if r.queue.startswith(queue + ".s")]  # no row of its own


async def test_a_broker_without_the_consistent_hash_exchange_stops_the_worker_at_start(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker's answer to an exchange type it does not know (what it says without the plugin;
    the plugin is not disabled here: the machine's broker is shared), as one line."""
    queue = bench.name("noplugin")
    await bench.transport.declare([counting(queue, Counter(), fair=False)])
    monkeypatch.setattr(layout, "FAIR_EXCHANGE_TYPE", "x-b24queue-not-a-type")
    cls = counting(queue, Counter(), fair=True)
    with pytest.raises(ConfigError) as caught:
        async with Worker(bench.settings, [cls]):
            pass
    message = str(caught.value)
    assert message.startswith(f"{cls.__name__}.fair_share: RabbitMQ has no consistent-hash")
    assert "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange" in message
    assert "or set fair_share = False" in message and "\n" not in message
    # The queue made before is still bound (unbound only once the new way in is): the events
    # published meanwhile still wait in it.
    assert await bindings_to(bench, "q", queue) == {"ONCRMDEALADD"}
    await publish(bench, envelope(FLOOD, 3))
    assert (await waiting(bench, queue))[queue] == 3


async def test_a_stopping_worker_hands_back_what_waited_for_a_slot(bench: Bench) -> None:
    """A fair worker holds more deliveries than it has slots; stopping, it hands back those not
    started (at once, not when its channel closes), and the next worker handles each once."""
    queue = bench.name("handback")
    started: Counter[str] = Counter()
    release = asyncio.Event()

    async def slow(self: EventConsumer, event: Event) -> None:
        started[event.message_id or ""] += 1
        await release.wait()

    cls = consumer(queue, ("ONCRMDEALADD",), slow, prefetch=2)
    await bench.transport.declare([cls])
    sent = envelope(FLOOD, 20) + envelope(QUIET[0], 5) + envelope(QUIET[1], 5)
    await publish(bench, sent)
    worker = Worker(bench.settings, [cls])
    await worker.__aenter__()
    try:
        await wait_until(lambda: len(started) == 2, 15, "two started")
        runner: Any = worker.runners[0]
        await wait_until(lambda: len(runner._waiting) == 28, 15, "the rest held by the worker")
        stopping = asyncio.create_task(worker.shutdown())
        await asyncio.sleep(0.5)  # the handback comes before the handlers end
        assert sum((await waiting(bench, queue)).values()) == 28
        release.set()
        await stopping
    finally:
        release.set()
    async with Worker(bench.settings, [cls]):
        await wait_until(lambda: set(started) == ids(sent), 30, "all handled")
    assert set(started.values()) == {1}
    assert sum((await waiting(bench, queue)).values()) == 0
