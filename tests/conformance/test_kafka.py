"""The Kafka transport's own traps, on a Tansu the tests start (memory storage: a restart of the
broker loses everything, so durability across one cannot be tested here): two worker processes
sharing a queue through a rebalance, the ingress spooling while Kafka is unreachable, the CLI."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from tests.conformance.conftest import Bench, kafka_settings
from tests.integration.conftest import wait_until
from tests.integration.consumers import Crasher
from tests.integration.proxy import Proxy, free_port
from tests.kafka_server import KafkaServer, kafka_server
from tests.processes import cli, env_for, ingress_up, post, start, start_workers, stop


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _starts(record: Path) -> list[tuple[str, str]]:
    if not record.exists():
        return []
    return [
        (parts[1], parts[2])
        for parts in (ln.split() for ln in record.read_text().splitlines())
        if parts[0] == "start"
    ]


def _done(record: Path) -> set[str]:
    if not record.exists():
        return set()
    return {ln.split()[1] for ln in record.read_text().splitlines() if ln.startswith("done ")}


async def test_a_second_worker_takes_partitions_and_nothing_is_lost_or_doubled(
    tansu: KafkaServer, tmp_path: Path
) -> None:
    prefix = _prefix()
    bench = Bench(kafka_settings(tansu, prefix), prefix)
    record = tmp_path / "record.txt"
    env = env_for(
        bench.settings,
        record,
        B24QT_QUEUE=bench.name("shared"),
        B24QT_PREFETCH="4",
        B24QT_SLEEP_S="0.2",
    )
    [first] = await start_workers(env, tmp_path, "tests.integration.consumers:Recorder", 1)
    try:
        ids = await bench.post(*["crm-deal-add"] * 40)
        await wait_until(lambda: len(_done(record)) >= 4, 30, "the first worker busy")
        log = tmp_path / "second.log"
        second = await start("worker", "tests.integration.consumers:Recorder", env=env, log=log)

        async def both_members() -> bool:
            status = await bench.transport.status()
            return any(r.queue == bench.name("shared") and r.consumers == 2 for r in status.queues)

        await wait_until(both_members, 60, "two members in the group")
        more = await bench.post(*["crm-deal-add"] * 20)
        await wait_until(lambda: _done(record) >= set(ids + more), 60, "every event handled")
        for proc in (first, second):
            assert await stop(proc) == 0
    finally:
        for proc in (first,):
            if proc.returncode is None:
                proc.kill()
    starts = _starts(record)
    assert {m for m, _ in starts} == set(ids + more)
    # Handled again only when the group moved a partition under an unsettled event, and then
    # the later delivery says so.
    seen: set[str] = set()
    for message_id, flag in starts:
        assert message_id not in seen or flag == "1", (message_id, starts)
        seen.add(message_id)


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
    consumer_ = "tests.integration.consumers:SlowFirst"
    [worker] = await start_workers(env, tmp_path, consumer_, 1)
    ids = await bench.post(*["crm-deal-add"] * 5)  # one portal: one partition, in this order
    await wait_until(lambda: len(_done(record)) == 4, 30, "four done after the slow first")
    [slow] = set(ids) - _done(record)
    assert slow == ids[0]
    worker.kill()
    await worker.wait()
    before = len(_starts(record))
    env["B24QT_SLEEP_S"] = "0"
    [worker] = await start_workers(env, tmp_path, consumer_, 1)
    await wait_until(lambda: slow in _done(record), 60, "the slow event handled again")
    assert await stop(worker) == 0
    again = _starts(record)[before:]
    assert slow in {m for m, _ in again} and {flag for _, flag in again} == {"1"}, again


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
            [worker] = await start_workers(env, tmp_path, "tests.integration.consumers:Crasher", 1)
            assert await asyncio.wait_for(worker.wait(), 60) != 0
            assert len(_starts(record)) == crashes

        async def dead() -> bool:
            return await dlq.count() == 1

        [worker] = await start_workers(env, tmp_path, "tests.integration.consumers:Crasher", 1)
        await wait_until(dead, 60, "the poison event dead-lettered")
        _, [letter] = await dlq.list(10)
        assert await stop(worker) == 0
    assert letter.message_id == poison and letter.reason == "delivery_limit"
    assert _starts(record) == [(poison, "0"), (poison, "1")]


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
        [worker] = await start_workers(env, tmp_path, "tests.integration.consumers:Recorder", 1)
        port = free_port()
        ingress = await ingress_up(settings, tmp_path, port)
        url = f"http://127.0.0.1:{port}/b24/events"
        before = await post(url, 3)
        await wait_until(lambda: _done(record) >= set(before), 30, "the first events handled")
        await proxy.cut()
        during = await post(url, 3)  # 200 all the same: kept in the ingress's spool
        assert not _done(record) & set(during)
        await proxy.start()
        await wait_until(lambda: _done(record) >= set(during), 60, "the spooled events handled")
        for proc in (ingress, worker):
            assert await stop(proc) == 0
        await proxy.cut()  # closes its listening socket
        said = (tmp_path / "ingress.log").read_text()
        assert "spool" in said.lower(), said[-2000:]


async def test_topology_status_and_dlq_from_the_cli(tansu: KafkaServer) -> None:
    prefix = _prefix()
    settings = kafka_settings(tansu, prefix)
    code, out = await cli(settings, "topology", "tests.integration.consumers:Narrowing")
    assert code == 0 and "cli.deals.dlq" in out, out
    code, out = await cli(settings, "status", "--json")
    assert code == 0, out
    lines = out.splitlines(keepends=True)
    status = json.loads("".join(lines[lines.index("{\n") :]))  # after any log lines
    assert [r["queue"] for r in status["queues"]] == ["cli.deals"], status
    code, out = await cli(settings, "dlq", "list", "cli.deals")
    assert code == 0 and "empty" in out, out
