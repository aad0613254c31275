"""The Kafka transport's own traps, on a Tansu the tests start (memory storage: a restart of the
broker loses everything, so durability across one cannot be tested here): two worker processes
sharing a queue through a rebalance, the ingress spooling while Kafka is unreachable, the CLI."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import aiohttp
import pytest

from b24queue.transports.kafka.client import REVOKE_WAIT_S
from tests.support.bench import Bench
from tests.support.consumers import Crasher, record_done, record_starts
from tests.support.kafka_server import KafkaServer, kafka_server, kafka_settings
from tests.support.processes import cli, env_for, ingress_up, post, start, start_workers, stop
from tests.support.proxy import Proxy, free_port
from tests.support.samples import FORM, sample_form
from tests.support.wait import wait_until

SAMPLE_MEMBER = b"5f2a9c3e1b7d4a6f8e0c2b4d6f8a0c1e"  # the samples' portal


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def _post_portals(bench: Bench, portals: list[str], per_portal: int) -> list[str]:
    """Deal additions from several portals (member_ids: several partitions), interleaved."""
    form = sample_form("crm-deal-add")
    ids = []
    async with bench.ingress() as client:
        for _ in range(per_portal):
            for member in portals:
                data = form.replace(SAMPLE_MEMBER, member.encode())
                resp = await client.post("/b24/events", data=data, headers=FORM)
                assert resp.status == 200, await resp.text()
                ids.append((await resp.json())["message_id"])
    return ids


@pytest.mark.fault
async def test_a_second_worker_takes_partitions_and_nothing_is_lost_or_doubled(
    tansu: KafkaServer, tmp_path: Path
) -> None:
    """Six portals' events over the partitions; the first worker's first event of each portal
    outlives the revoke wait (REVOKE_WAIT_S) when the second worker joins: the partitions it
    gives up go with those events open, and the second worker handles them flagged
    redelivered. Every event is handled; one handled twice is flagged the second time."""
    prefix = _prefix()
    bench = Bench(kafka_settings(tansu, prefix), prefix)
    records = [tmp_path / "first.txt", tmp_path / "second.txt"]
    env = env_for(
        bench.settings,
        records[0],
        B24QT_QUEUE=bench.name("shared"),
        B24QT_PREFETCH="16",
        B24QT_SLEEP_S=str(REVOKE_WAIT_S + 12),
    )
    portals = [f"{i:032x}" for i in range(1, 7)]
    consumer_ = "tests.support.consumers:SlowFirstPerPortal"
    procs: list[asyncio.subprocess.Process] = []
    try:
        procs += await start_workers(env, tmp_path, consumer_, 1)
        ids = await _post_portals(bench, portals, 3)
        slow = set(ids[: len(portals)])  # the first of each portal
        fast = len(ids) - len(portals)
        await wait_until(lambda: len(record_done(records[0])) >= fast, 30, "the fast ones handled")
        env2 = env | {"B24QT_RECORD": str(records[1]), "B24QT_SLEEP_S": "0"}
        procs.append(await start("worker", consumer_, env=env2, log=tmp_path / "second.log"))

        async def both_members() -> bool:
            status = await bench.transport.status()
            return any(r.queue == bench.name("shared") and r.consumers == 2 for r in status.queues)

        await wait_until(both_members, 60, "two members in the group")
        more = await _post_portals(bench, portals, 2)
        done = lambda: record_done(records[0]) | record_done(records[1])  # noqa: E731
        await wait_until(lambda: done() >= set(ids + more), 90, "every event handled")
        for proc in procs:
            assert await stop(proc) == 0
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    first, second = record_starts(records[0]), record_starts(records[1])
    assert first and second, "both workers handled events"
    assert {m for m, _ in first + second} == set(ids + more)
    # The partitions that moved took their slow event open: handled again, flagged.
    assert {m for m, flag in second if flag == "1"} & slow, second
    # Handled again only when the group moved a partition under an unsettled event, and then
    # the later delivery says so.
    seen: set[str] = set()
    for message_id, flag in first + second:
        assert message_id not in seen or flag == "1", (message_id, first, second)
        seen.add(message_id)


@pytest.mark.fault
async def test_a_commit_never_passes_an_unfinished_event(
    tansu: KafkaServer, tmp_path: Path
) -> None:
    """One portal's events share a partition; the first is slow, the next four finish; the
    worker is killed: the slow one (and what came after it, uncommitted) comes again, flagged.
    Committing the highest settled offset instead would lose it."""
    prefix = _prefix()
    bench = Bench(kafka_settings(tansu, prefix), prefix)
    record = tmp_path / "record.txt"
    env = env_for(bench.settings, record, B24QT_QUEUE=bench.name("order"), B24QT_SLEEP_S="60")
    consumer_ = "tests.support.consumers:SlowFirst"
    [worker] = await start_workers(env, tmp_path, consumer_, 1)
    ids = await bench.post(*["crm-deal-add"] * 5)  # one portal: one partition, in this order
    await wait_until(lambda: len(record_done(record)) == 4, 30, "four done after the slow first")
    [slow] = set(ids) - record_done(record)
    assert slow == ids[0]
    worker.kill()
    await worker.wait()
    before = len(record_starts(record))
    env["B24QT_SLEEP_S"] = "0"
    [worker] = await start_workers(env, tmp_path, consumer_, 1)
    await wait_until(lambda: slow in record_done(record), 60, "the slow event handled again")
    assert await stop(worker) == 0
    again = record_starts(record)[before:]
    assert slow in {m for m, _ in again} and {flag for _, flag in again} == {"1"}, again


@pytest.mark.fault
async def test_an_event_that_kills_its_worker_every_time_ends_in_the_dlq(
    tansu: KafkaServer, tmp_path: Path
) -> None:
    """max_deliveries 2: handed out twice (two workers killed by it), the third worker
    dead-letters it unhandled: Kafka keeps no delivery count, `<queue>.deliveries` does."""
    prefix = _prefix()
    bench = Bench(kafka_settings(tansu, prefix), prefix)
    record = tmp_path / "record.txt"
    queue = bench.name("poison")
    env = env_for(bench.settings, record, B24QT_QUEUE=queue, B24QT_MAX_DELIVERIES="2")
    # Bound before the event comes: Crasher's bindings, this test's queue.
    await bench.transport.declare([type("Poison", (Crasher,), {"queue": queue})])
    [poison] = await bench.post("crm-deal-add")
    async with bench.transport.dead_letters(queue) as dlq:
        for crashes in (1, 2):
            [worker] = await start_workers(env, tmp_path, "tests.support.consumers:Crasher", 1)
            assert await asyncio.wait_for(worker.wait(), 60) != 0
            assert len(record_starts(record)) == crashes

        async def dead() -> bool:
            return await dlq.count() == 1

        [worker] = await start_workers(env, tmp_path, "tests.support.consumers:Crasher", 1)
        await wait_until(dead, 60, "the poison event dead-lettered")
        _, [letter] = await dlq.list(10)
        assert await stop(worker) == 0
    assert letter.message_id == poison and letter.reason == "delivery_limit"
    assert record_starts(record) == [(poison, "0"), (poison, "1")]


@pytest.mark.long  # a broker away for a while, 8 s: make faults runs it
async def test_the_ingress_spools_while_kafka_is_unreachable(tmp_path: Path) -> None:
    """Kafka behind a proxy it advertises (every client goes through it); the proxy is cut."""
    proxy_port = free_port()
    with kafka_server(advertised_port=proxy_port) as server:
        proxy = Proxy(server.port)
        proxy.port = proxy_port
        await proxy.start()
        prefix = _prefix()
        settings = kafka_settings(server, prefix, broker_url=f"kafka://127.0.0.1:{proxy_port}")
        record = tmp_path / "record.txt"
        env = env_for(settings, record, B24QT_QUEUE=f"{prefix}.spooled")
        [worker] = await start_workers(env, tmp_path, "tests.support.consumers:Recorder", 1)
        port = free_port()
        ingress = await ingress_up(settings, tmp_path, port)
        url = f"http://127.0.0.1:{port}/b24/events"
        before = await post(url, 3)
        await wait_until(lambda: record_done(record) >= set(before), 30, "the first events handled")
        await proxy.cut()
        during = await post(url, 3)  # 200 all the same: kept in the ingress's spool
        metrics = f"http://127.0.0.1:{port}/metrics"
        assert await _spool_events(metrics) == 3  # in the spool, not in Kafka
        await proxy.start()
        await wait_until(
            lambda: record_done(record) >= set(during), 60, "the spooled events handled"
        )

        async def drained() -> bool:
            return await _spool_events(metrics) == 0

        await wait_until(drained, 30, "the spool empty")
        for proc in (ingress, worker):
            assert await stop(proc) == 0
        await proxy.cut()  # closes its listening socket
        said = (tmp_path / "ingress.log").read_text()
        assert "spool" in said.lower(), said[-2000:]


async def _spool_events(metrics_url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(metrics_url) as resp:
        text = await resp.text()
    [value] = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("b24queue_ingress_spool_events")
    ]
    return value


async def test_topology_status_and_dlq_from_the_cli(tansu: KafkaServer) -> None:
    prefix = _prefix()
    settings = kafka_settings(tansu, prefix)
    code, out = await cli(settings, "topology", "tests.support.consumers:Narrowing")
    assert code == 0 and "cli.deals.dlq" in out, out
    code, out = await cli(settings, "status", "--json")
    assert code == 0, out
    lines = out.splitlines(keepends=True)
    status = json.loads("".join(lines[lines.index("{\n") :]))  # after any log lines
    assert [r["queue"] for r in status["queues"]] == ["cli.deals"], status
    code, out = await cli(settings, "dlq", "list", "cli.deals")
    assert code == 0 and "empty" in out, out
