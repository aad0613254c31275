"""Operations against the real broker and management API: status, dead-letter tools, metrics,
and that definitions.json describes what `topology` declares."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from b24queue import Event, EventConsumer, Reject
from b24queue import _constants as c
from b24queue.telemetry.metrics import WorkerMetrics
from b24queue.transports.amqp.definitions import definitions
from b24queue.worker import Worker, declare_topology
from tests.support.proxy import free_port
from tests.support.rabbitmq import Broker, cli_env, run_cli, running_ingress
from tests.support.samples import SAMPLE_TOKEN, sample_form
from tests.support.wait import wait_until

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.broker


def env_for(broker: Broker) -> dict[str, str]:
    return cli_env(broker)


async def cli(broker: Broker, *args: str) -> tuple[int, str]:
    return await run_cli(broker, *args)


def consumer(queue: str, handle: Any, **attrs: Any) -> type[EventConsumer]:
    body = {"queue": queue, "events": ("ONCRMDEALADD",), "handle": handle, **attrs}
    return type("Ops", (EventConsumer,), body)


async def noop(self: EventConsumer, event: Event) -> None:
    return None


async def publish_to(broker: Broker, queue: str, count: int, headers: dict[str, Any]) -> list[str]:
    ids = []
    async with broker.connection.channel() as channel:
        for i in range(count):
            message_id = f"{queue}-{i}"
            await channel.default_exchange.publish(
                aio_pika.Message(
                    json.dumps(
                        {
                            "event": "ONCRMDEALADD",
                            "data": {"FIELDS": {"ID": str(i)}},
                            "auth": {"domain": "acme.bitrix24.com"},
                        }
                    ).encode(),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=message_id,
                    type="ONCRMDEALADD",
                    headers=headers,
                    content_type="application/json",
                ),
                routing_key=queue,
            )
            ids.append(message_id)
    return ids


async def test_status_reports_what_is_in_the_queues(broker: Broker) -> None:
    cls = consumer(broker.name("stat"), noop, retry_delays_s=(600,))
    await declare_topology(broker.settings, [cls])
    q = cls.queue
    await publish_to(broker, q, 5, {})
    await publish_to(broker, f"{q}.dlq", 2, {c.H_DEAD_LETTER_REASON: "rejected"})
    await publish_to(broker, f"{q}.retry.600s", 1, {})
    await publish_to(broker, broker.settings.unrouted, 3, {})
    # Hold 2 of the 5 unacked, as a busy worker would.
    async with broker.connection.channel() as channel:
        await channel.set_qos(prefetch_count=2)
        queue = await channel.get_queue(q)
        held: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            held.append(message)

        await queue.consume(hold)

        async def numbers_match() -> bool:
            code, out = await cli(broker, "status", "--json")
            assert code == 0, out
            data = json.loads(out)
            rows = {r["queue"]: r for r in data["queues"]}
            row = rows.get(q)
            return bool(row) and (
                row["ready"],
                row["unacked"],
                row["consumers"],
                row["retrying"],
                row["dead_letters"],
                data["unrouted"],
            ) == (3, 2, 1, 1, 2, 3)

        # The management API refreshes its numbers every 5 s.
        await wait_until(numbers_match, timeout_s=30, what="status numbers")
        code, out = await cli(broker, "status")
        assert code == 0
        line = next(x for x in out.splitlines() if x.startswith(q + " "))
        assert line.split()[:5] == [q, "quorum", "3", "2", "1"]
        # RETRYING, DLQ, and PORTALS: RabbitMQ cannot count the portals without consuming.
        assert line.split()[-3:] == ["1", "2", "-"]
        assert f"{broker.settings.unrouted}: 3 message(s)" in out
        code, out = await cli(broker, "status", "--fail-on-dead-letters")
        assert code == 1 and "DEAD LETTERS" in out


async def test_status_with_a_wrong_management_url_is_a_clear_error(broker: Broker) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "b24queue",
        "status",
        cwd=ROOT,
        env={**env_for(broker), "B24QUEUE_MANAGEMENT_URL": f"http://127.0.0.1:{free_port()}"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 3
    assert b"cannot reach the RabbitMQ management API" in out
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "b24queue",
        "status",
        cwd=ROOT,
        env={**env_for(broker), "B24QUEUE_AMQP_URL": "amqp://guest:wrong@127.0.0.1:5672/"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 2
    assert b"refused the credentials" in out
    assert b"wrong" not in out


async def test_list_then_replay_then_the_fixed_consumer_handles_them(broker: Broker) -> None:
    broken = True
    handled: list[str] = []

    async def handle(self: EventConsumer, event: Event) -> None:
        if broken:
            raise Reject("deal service says no")
        handled.append(event.message_id or "")

    cls = consumer(broker.name("fixme"), handle)
    async with Worker(broker.settings, [cls]):
        answered = []
        async with running_ingress(broker.settings) as (client, _):
            for _ in range(3):
                resp = await client.post(
                    "/b24/events", data=sample_form("crm-deal-add"), headers=FORM
                )
                answered.append((await resp.json())["message_id"])
        await wait_until(lambda: _depth_is(broker, f"{cls.queue}.dlq", 3), what="3 dead")

        code, out = await cli(broker, "dlq", "list", cls.queue, "--json")
        assert code == 0, out
        listed = json.loads(out)
        assert listed["total"] == 3
        assert [m["message_id"] for m in listed["messages"]] == answered  # order kept
        assert {m["reason"] for m in listed["messages"]} == {"rejected"}
        assert {m["error"] for m in listed["messages"]} == {"Reject: deal service says no"}
        assert SAMPLE_TOKEN not in out
        code, again = await cli(broker, "dlq", "list", cls.queue, "--json")
        assert [m["message_id"] for m in json.loads(again)["messages"]] == answered
        code, text = await cli(broker, "dlq", "list", f"{cls.queue}.dlq")
        assert code == 0 and "deal service says no" in text and answered[0] in text

        broken = False  # the fix is deployed
        code, out = await cli(broker, "dlq", "replay", cls.queue, "--id", answered[1])
        assert code == 0, out
        assert "replayed 1 of 3" in out
        await wait_until(lambda: handled == [answered[1]], what="one replayed and handled")
        # The two held back return to the queue when the replay's channel closes.
        await wait_until(lambda: _depth_is(broker, f"{cls.queue}.dlq", 2), what="2 left")
        code, out = await cli(broker, "dlq", "list", cls.queue, "--json")
        assert [m["message_id"] for m in json.loads(out)["messages"]] == [answered[0], answered[2]]

        code, out = await cli(broker, "dlq", "replay", cls.queue)
        assert code == 0 and "replayed 2 of 2" in out, out
        await wait_until(lambda: sorted(handled) == sorted(answered), what="all handled")
    assert await broker.depth(f"{cls.queue}.dlq") == 0


async def _depth_is(broker: Broker, queue: str, count: int) -> bool:
    return await broker.depth(queue) == count


async def test_replay_killed_midway_loses_nothing(broker: Broker) -> None:
    cls = consumer(broker.name("bulk"), noop)
    await declare_topology(broker.settings, [cls])  # declared, but no worker consumes
    ids = await publish_to(broker, f"{cls.queue}.dlq", 2000, {c.H_DEAD_LETTER_REASON: "rejected"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "b24queue",
        "dlq",
        "replay",
        cls.queue,
        cwd=ROOT,
        env=env_for(broker),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_until(lambda: _depth_at_least(broker, cls.queue, 50), what="replay under way")
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
    seen: list[str] = []
    for name in (cls.queue, f"{cls.queue}.dlq"):
        depth = await broker.depth(name)
        seen += [m.message_id or "" for m in await broker.take(name, depth)] if depth else []
    assert await broker.depth(f"{cls.queue}.dlq") == 0
    assert set(seen) == set(ids)  # nothing lost
    duplicates = len(seen) - len(set(seen))
    assert duplicates <= 1  # at most the one published but not yet acked when killed
    # The kill really was mid-way: part went back, part stayed.
    assert 0 < sum(1 for m in seen if m) <= len(seen)


async def _depth_at_least(broker: Broker, queue: str, count: int) -> bool:
    return await broker.depth(queue) >= count


async def test_purge_and_unrouted_replay(broker: Broker) -> None:
    cls = consumer(broker.name("purge"), noop)
    await declare_topology(broker.settings, [cls])
    await publish_to(broker, f"{cls.queue}.dlq", 3, {})
    code, out = await cli(broker, "dlq", "purge", cls.queue)
    assert code == 2 and "pass --yes" in out  # no terminal to ask: refuse
    assert await broker.depth(f"{cls.queue}.dlq") == 3
    code, out = await cli(broker, "dlq", "purge", cls.queue, "--yes")
    assert code == 0 and "purged 3" in out and "kept" not in out
    assert await broker.depth(f"{cls.queue}.dlq") == 0
    code, out = await cli(broker, "dlq", "purge", cls.queue)  # nothing to ask about
    assert code == 0 and "is empty; nothing purged" in out, out

    # An event that landed in unrouted before its consumer existed goes through the exchange.
    async with running_ingress(broker.settings) as (client, _):
        resp = await client.post("/b24/events", data=sample_form("task-add"), headers=FORM)
        message_id = (await resp.json())["message_id"]
    late = await broker.bind_queue("late", "ONTASKADD")
    code, out = await cli(broker, "dlq", "replay", broker.settings.unrouted)
    assert code == 0 and "replayed 1 of 1" in out, out
    [message] = await broker.take(late, 1)
    assert message.message_id == message_id
    assert message.headers["x-b24queue-replays"] == 1


async def test_metrics_change_as_events_flow(broker: Broker) -> None:
    async def flaky(self: EventConsumer, event: Event) -> None:
        if event.attempt == 1:
            raise RuntimeError("once")

    cls = consumer(broker.name("metered"), flaky, retry_delays_s=(0.1,))
    metrics = WorkerMetrics()
    port = free_port()
    metrics.serve("127.0.0.1", port)
    async with (
        Worker(broker.settings, [cls], metrics),
        running_ingress(broker.settings) as (
            client,
            _,
        ),
    ):
        before = await (await client.get("/metrics")).text()
        assert value(before, "b24queue_ingress_accepted_total", event="ONCRMDEALADD") is None
        await client.post("/b24/events", data=sample_form("crm-deal-add"), headers=FORM)
        await client.post("/b24/events", data=b"event=ONX", headers=FORM)  # 401
        await client.post("/b24/events", data=b"nope", headers={"Content-Type": "text/plain"})
        after = await (await client.get("/metrics")).text()
        assert value(after, "b24queue_ingress_accepted_total", event="ONCRMDEALADD") == 1
        assert value(after, "b24queue_ingress_refused_total", reason="unauthorized") == 1
        assert value(after, "b24queue_ingress_refused_total", reason="unsupported_type") == 1
        assert value(after, "b24queue_ingress_publish_seconds_count") == 1

        def scraped() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
                return str(resp.read().decode())

        labels = {"queue": cls.queue, "event": "ONCRMDEALADD"}
        await wait_until(
            lambda: value(scraped(), "b24queue_worker_events_total", outcome="ack", **labels) == 1,
            what="worker metrics",
        )
        text = scraped()
        assert value(text, "b24queue_worker_events_total", outcome="retry", **labels) == 1
        assert value(text, "b24queue_worker_handle_seconds_count", **labels) == 2
        # Its wait for a handler: the first attempt only (the retry's includes its delay).
        assert value(text, "b24queue_worker_wait_seconds_count", queue=cls.queue) == 1
        assert value(text, "b24queue_worker_in_flight", queue=cls.queue) == 0


def value(text: str, name: str, **labels: str) -> float | None:
    """One sample of a Prometheus text page, or None."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


async def test_declared_topology_agrees_with_definitions(broker: Broker) -> None:
    cls = consumer(broker.name("defs"), noop, retry_delays_s=(1, 5))
    await declare_topology(broker.settings, [cls])
    expected = definitions(broker.settings, [cls])
    queues = {
        q["name"]: q
        for q in await broker.mgmt.get("/api/queues/%2F")
        if q["name"].startswith(broker.prefix)
    }
    assert set(queues) == {q["name"] for q in expected["queues"]}
    for q in expected["queues"]:
        assert queues[q["name"]]["arguments"] == q["arguments"], q["name"]
        assert queues[q["name"]]["durable"] is True
    exchanges = {
        x["name"]: x
        for x in await broker.mgmt.get("/api/exchanges/%2F")
        if x["name"].startswith(broker.prefix)
    }
    for x in expected["exchanges"]:
        assert exchanges[x["name"]]["type"] == x["type"]
        assert exchanges[x["name"]]["arguments"] == x["arguments"]
    bindings = {
        (b["source"], b["destination"], b["routing_key"])
        for b in await broker.mgmt.get("/api/bindings/%2F")
        if b["source"].startswith(broker.prefix)
    }
    assert bindings == {
        (b["source"], b["destination"], b["routing_key"]) for b in expected["bindings"]
    }
    policies = {p["name"]: p for p in await broker.mgmt.get("/api/policies/%2F")}
    for p in expected["policies"]:
        assert policies[p["name"]]["definition"] == p["definition"]
        assert policies[p["name"]]["pattern"] == p["pattern"]
