"""Every fault we can cause, under load through the real ingress and workers: afterwards every
event answered 200 was handled, or waits in a queue or the DLQ. Lost must be 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.faults import CONSUMER_TIMEOUT_MS, SUMMARY, Harness, Load, node_ctl
from tests.support.processes import children_of
from tests.support.proxy import Proxy

pytestmark = pytest.mark.broker


async def until_accepted(load: Load, count: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while len(load.accepted) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(load.accepted)} accepted: {dict(load.statuses)}")
        await asyncio.sleep(0.02)


async def test_broker_stopped_and_restarted_mid_load(harness: Harness) -> None:
    await harness.start_ingress()
    harness.start_worker()
    await harness.wait_consuming()
    load = Load()
    outage_over = asyncio.Event()

    async def keep_loading() -> None:
        # In rounds of 100, 1,500 at least and on until the outage has met the load (something
        # spooled) or is over: a fixed count could all be answered before stop_app took effect
        # (it was, once publishing got faster).
        first = 0
        while first < 1500 or not (
            outage_over.is_set() or await harness.metric("b24queue_ingress_spooled_total") > 0
        ):
            await harness.load(load, 100, concurrency=16, first=first)
            first += 100

    task = asyncio.create_task(keep_loading())
    await until_accepted(load, 300)
    await asyncio.to_thread(node_ctl, "stop_app")
    await asyncio.sleep(2)  # the outage: the ingress spools what comes in meanwhile
    await asyncio.to_thread(node_ctl, "start_app")
    outage_over.set()
    await task
    # With the spool on, the outage costs no event: all were accepted.
    assert load.statuses[200] == load.sent, dict(load.statuses)
    await harness.settle(load, "broker stop_app/start_app")
    assert await harness.metric("b24queue_ingress_spooled_total") > 0  # the outage was real
    assert await harness.metric("b24queue_ingress_spool_events") == 0


async def test_connections_force_closed_by_the_broker(harness: Harness) -> None:
    await harness.start_ingress()
    harness.start_worker()
    await harness.wait_consuming()
    load = Load()
    task = asyncio.create_task(harness.load(load, 1500, concurrency=16))
    for after in (300, 700, 1100):
        await until_accepted(load, after)
        await asyncio.to_thread(node_ctl, "close_all_connections", "fault test")
    await task
    await harness.settle(load, "close_all_connections x3")


async def test_workers_killed_and_stopped_under_load(harness: Harness) -> None:
    await harness.start_ingress()
    first = harness.start_worker(B24QT_SLEEP_S="0.01")
    second = harness.start_worker(B24QT_SLEEP_S="0.01")
    await harness.wait_consuming(2)
    load = Load()
    task = asyncio.create_task(harness.load(load, 1500, concurrency=16))
    await until_accepted(load, 400)
    first.send_signal(signal.SIGKILL)  # mid-handler: its unacked deliveries go back
    await until_accepted(load, 800)
    second.send_signal(signal.SIGTERM)  # graceful: finishes what it holds
    assert await asyncio.to_thread(second.wait, 30) == 0
    harness.start_worker()
    await task
    await harness.settle(load, "worker SIGKILL + SIGTERM")


async def test_a_handler_hanging_past_the_consumer_timeout(harness: Harness) -> None:
    # The node's consumer_timeout is short here; the handler has no timeout of its own, so the
    # broker closes the channel under it and redelivers; the worker's channel comes back.
    await harness.start_ingress()
    harness.start_worker(B24QT_HANG_S=str(CONSUMER_TIMEOUT_MS / 1000 + 8))
    await harness.wait_consuming()
    load = Load()
    await harness.load(load, 2, concurrency=1, mode="hang-once", first=0)
    await harness.load(load, 200, concurrency=8, first=2)
    # The two redelivered copies are handled at once; the hung originals finish later.
    deadline = time.monotonic() + 60
    while len(harness.handled()) < len(load.accepted) + 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    row = await harness.settle(load, "handler hangs past consumer_timeout", timeout_s=120)
    assert row["handled"] == row["accepted"]
    # The broker really did close the channel under the hung handler: the hung copy finished
    # later (a duplicate: at-least-once), and its ack was not tried on the dead channel.
    worker_log = harness.tail()
    assert "its channel is gone" in worker_log, worker_log
    assert row["duplicates"] >= 1


async def test_a_hanging_handler_is_cut_by_its_own_timeout(harness: Harness) -> None:
    await harness.start_ingress()
    harness.start_worker(B24QT_HANG_S="3600", B24QT_HANDLE_TIMEOUT_S="1")
    await harness.wait_consuming()
    load = Load()
    await harness.load(load, 3, concurrency=3, mode="hang-once")
    await harness.load(load, 100, concurrency=8, first=3)
    row = await harness.settle(load, "handler timeout, then retry", timeout_s=60)
    assert row["handled"] == row["accepted"]


async def test_a_message_that_kills_the_worker_ends_in_the_dlq(harness: Harness) -> None:
    await harness.start_ingress()
    env = {"B24QT_MAX_DELIVERIES": "3", "B24QT_PREFETCH": "1"}
    harness.start_worker(**env)
    await harness.wait_consuming()
    load = Load()
    await harness.load(load, 1, concurrency=1, mode="crash")
    await harness.load(load, 50, concurrency=4, first=1)
    # A supervisor (systemd, Kubernetes) restarts the worker each time it dies.
    restarts = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if all(w.poll() is not None for w in harness.workers):
            restarts += 1
            assert restarts <= 10, "crash loop not broken by the delivery limit"
            harness.start_worker(**env)
        if len(set(load.accepted) - set(harness.handled())) <= 1 and restarts:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)  # let a last restart pick nothing up
    row = await harness.settle(load, "poison message crashes worker", expect_dlq=1, timeout_s=30)
    [poison] = load.accepted[:1]
    assert poison in harness.dead_lettered
    # Every other event was handled, or dead-lettered beside the poison: a fair queue's worker
    # holds deliveries from every shard (docs/fairness.md), and those it held but had not
    # started when it crashed are handed back too, each counting a delivery on a quorum queue,
    # so one held through every crash of the loop reaches the limit with the poison. In the
    # DLQ with its reason, replayable; never lost (settle checks).
    assert row["handled"] + row["in_dlq"] == row["accepted"]
    assert 1 <= restarts <= 5, restarts


async def test_memory_alarm_without_spool_refuses_quickly(fault_node: str, tmp_path: Path) -> None:
    harness = Harness(tmp_path, spool=False)
    try:
        await harness.start_ingress(B24QUEUE_PUBLISH_TIMEOUT_S="4")
        await harness.wait_http("/readyz")
        await asyncio.to_thread(node_ctl, "set_vm_memory_high_watermark", "0.000001")
        try:
            load = Load()
            started = time.monotonic()
            await harness.load(load, 10, concurrency=5)
            elapsed = time.monotonic() - started
            assert load.statuses[503] == 10, dict(load.statuses)
            # Those written before RabbitMQ said it blocked us wait out their 4 s; none hangs.
            assert elapsed < 10, elapsed
            # Blocked now: not ready, and refused at once rather than after the publish timeout
            # (a publish written to a blocked connection waits in our buffers, never read).
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{harness.port}/readyz") as resp,
            ):
                assert resp.status == 503
            again = Load()
            started = time.monotonic()
            await harness.load(again, 10, concurrency=5)
            assert again.statuses[503] == 10, dict(again.statuses)
            assert time.monotonic() - started < 2, "waited for the publish timeout"
        finally:
            await asyncio.to_thread(node_ctl, "set_vm_memory_high_watermark", "0.6")
        SUMMARY.append(
            {
                "fault": "memory alarm, spool off (503s)",
                "sent": load.sent + again.sent,
                "accepted": 0,
                "refused": load.sent + again.sent,
                "handled": 0,
                "in_dlq": 0,
                "lost": 0,
                "duplicates": 0,
            }
        )
        load2 = Load()
        await harness.wait_http("/readyz")
        await harness.load(load2, 10, concurrency=5)
        assert load2.statuses[200] == 10, dict(load2.statuses)
    finally:
        harness.stop_all()


async def test_memory_alarm_with_spool_accepts_and_delivers_later(harness: Harness) -> None:
    await harness.start_ingress(B24QUEUE_PUBLISH_TIMEOUT_S="0.75")
    harness.start_worker()
    await harness.wait_consuming()
    await asyncio.to_thread(node_ctl, "set_vm_memory_high_watermark", "0.000001")
    try:
        load = Load()
        started = time.monotonic()
        await harness.load(load, 200, concurrency=8)
        elapsed = time.monotonic() - started
        assert load.statuses[200] == 200, dict(load.statuses)
        assert elapsed < 10, elapsed  # after the first timeouts, straight to the spool
        assert await harness.metric("b24queue_ingress_spooled_total") > 0
    finally:
        await asyncio.to_thread(node_ctl, "set_vm_memory_high_watermark", "0.6")
    await harness.settle(load, "memory alarm (publishers blocked)")


async def test_ingress_crash_with_a_non_empty_spool(harness: Harness) -> None:
    # The ingress reaches RabbitMQ through a proxy the test can cut.
    proxy = Proxy(target_port=int(harness.amqp_url.rsplit(":", 1)[1].strip("/")))
    await proxy.start()
    harness.amqp_url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    try:
        await harness.start_ingress()
        await harness.wait_http("/readyz")
        await proxy.cut()
        load = Load()
        await harness.load(load, 300, concurrency=8)
        assert load.statuses[200] == 300, dict(load.statuses)  # all spooled
        assert harness.ingress is not None
        harness.ingress.send_signal(signal.SIGKILL)
        harness.ingress.wait()
        await harness.start_worker_past(proxy)
        await harness.start_ingress()  # same spool file: it forwards what it holds
        row = await harness.settle(load, "ingress SIGKILL with spooled events")
        assert row["handled"] == 300
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{harness.port}/metrics") as resp,
        ):
            text = await resp.text()
        assert "b24queue_ingress_spool_events 0.0" in text
        assert "b24queue_ingress_forwarded_total 300.0" in text
    finally:
        await proxy.cut()


def spooled(path: Path) -> int:
    """Events in a spool file; 0 before its process created it (read-only: never creates it)."""
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            return int(db.execute("SELECT count(*) FROM spool").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # the file is there, its table not yet
                return 0
            raise


async def test_an_ingress_process_killed_with_spooled_events_then_fewer_processes(
    harness: Harness,
) -> None:
    # Two ingress processes spool while RabbitMQ is cut off; one is SIGKILLed (the parent then
    # stops the other); the ingress comes back with ONE process: the second process's spool
    # file must be merged and forwarded, not stranded.
    proxy = Proxy(target_port=int(harness.amqp_url.rsplit(":", 1)[1].strip("/")))
    await proxy.start()
    harness.amqp_url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    try:
        await harness.start_ingress(B24QUEUE_INGRESS_PROCESSES="2")
        await harness.wait_http("/readyz")
        await proxy.cut()
        load = Load()
        slot0, slot1 = harness.tmp / "spool.sqlite3", harness.tmp / "spool.1.sqlite3"
        # Which process accepts a connection is the kernel's choice: post in batches of 100
        # (a connection each), at least three, until both processes hold spooled events.
        for batch in range(10):
            await harness.load(load, 100, first=100 * batch, fresh_connections=True)
            if spooled(slot0) > 0 and spooled(slot1) > 0 and batch >= 2:
                break
        total = load.sent
        assert load.statuses[200] == total, (dict(load.statuses), harness.tail())  # all spooled
        assert spooled(slot0) + spooled(slot1) == total
        assert spooled(slot1) > 0, "1,000 requests reached only one of the two processes"
        assert harness.ingress is not None
        first = children_of(harness.ingress.pid)[0]
        os.kill(first, signal.SIGKILL)
        assert harness.ingress.wait(timeout=30) == 1
        await harness.start_worker_past(proxy)
        await harness.start_ingress(B24QUEUE_INGRESS_PROCESSES="1")
        row = await harness.settle(load, "ingress process SIGKILL, back with fewer")
        assert row["handled"] == total
        assert not slot1.exists()
        assert await harness.metric("b24queue_ingress_forwarded_total") == total
    finally:
        await proxy.cut()
