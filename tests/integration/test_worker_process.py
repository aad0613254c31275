"""A real `b24queue worker` process: graceful SIGTERM, SIGKILL mid-handler, exit codes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.support.rabbitmq import AMQP_URL, Broker, running_ingress
from tests.support.samples import sample_form
from tests.support.wait import wait_until

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.broker


def records(path: Path, kind: str) -> list[str]:
    if not path.exists():
        return []
    return [line.split()[1] for line in path.read_text().splitlines() if line.startswith(kind)]


async def start_worker(
    broker: Broker,
    record: Path,
    *,
    sleep_s: float,
    prefetch: int = 8,
    extra: dict[str, str] | None = None,
) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24QUEUE_", "B24QT_"))}
    env.update(
        {
            "B24QUEUE_AMQP_URL": AMQP_URL,
            "B24QUEUE_EXCHANGE": broker.settings.exchange,
            "B24QUEUE_UNROUTED": broker.settings.unrouted,
            "B24QUEUE_SHUTDOWN_TIMEOUT_S": "20",
            "B24QT_QUEUE": broker.name("proc"),
            "B24QT_RECORD": str(record),
            "B24QT_SLEEP_S": str(sleep_s),
            "B24QT_PREFETCH": str(prefetch),
            **(extra or {}),
        }
    )
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "b24queue",
        "worker",
        "tests.support.consumers:Recorder",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def consuming(broker: Broker, queue: str) -> bool:
    async with broker.connection.channel() as channel:
        q = await channel.declare_queue(queue, passive=True)
        return bool(q.declaration_result.consumer_count)


async def post(broker: Broker, count: int) -> list[str]:
    ids = []
    async with running_ingress(broker.settings) as (client, _):
        for _ in range(count):
            resp = await client.post("/b24/events", data=sample_form("crm-deal-add"), headers=FORM)
            assert resp.status == 200
            ids.append((await resp.json())["message_id"])
    return ids


async def test_sigterm_lets_in_flight_handlers_finish_and_acks_them(
    broker: Broker, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    queue = broker.name("proc")
    worker = await start_worker(broker, record, sleep_s=1.5, prefetch=4)
    try:
        await wait_until(lambda: _declared_and_consuming(broker, queue), what="worker consuming")
        ids = await post(broker, 4)
        await wait_until(lambda: len(records(record, "start")) == 4, what="4 handlers started")
        worker.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(worker.communicate(), timeout=30)
    finally:
        if worker.returncode is None:
            worker.kill()
    assert worker.returncode == 0, out.decode()
    assert sorted(records(record, "done")) == sorted(ids)
    assert await broker.depth(queue) == 0  # all acked: nothing to redeliver
    assert b"worker stopped" in out


async def test_sigkill_mid_handler_redelivers_to_the_next_worker(
    broker: Broker, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    queue = broker.name("proc")
    first = await start_worker(broker, record, sleep_s=3600, prefetch=1)
    try:
        await wait_until(lambda: _declared_and_consuming(broker, queue), what="worker consuming")
        [message_id] = await post(broker, 1)
        await wait_until(lambda: records(record, "start") == [message_id], what="handler started")
        first.kill()
        await first.wait()
    finally:
        if first.returncode is None:
            first.kill()
    second = await start_worker(broker, record, sleep_s=0)
    try:
        await wait_until(lambda: records(record, "done") == [message_id], what="redelivered")
    finally:
        second.send_signal(signal.SIGTERM)
        await asyncio.wait_for(second.communicate(), timeout=30)
    lines = record.read_text().splitlines()
    assert lines[-1] == f"done {message_id} 1"  # the second delivery says it was redelivered
    assert await broker.depth(queue) == 0


async def _declared_and_consuming(broker: Broker, queue: str) -> bool:
    try:
        return await consuming(broker, queue)
    except Exception:  # not declared yet: a passive declare fails
        return False


async def test_exit_codes(broker: Broker, tmp_path: Path) -> None:
    async def run(*args: str, env: dict[str, str]) -> tuple[int, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("B24QUEUE_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "b24queue",
            *args,
            cwd=ROOT,
            env={**base, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    code, out = await run("ingress", env={"B24QUEUE_HTTP_PORT": "nope"})
    assert code == 2 and "B24QUEUE_HTTP_PORT" in out
    code, out = await run("ingress", env={"B24QUEUE_APP_TOKENS": ""})
    assert code == 2 and "no application token configured" in out
    code, out = await run("worker", "no_such_module:X", env={})
    assert code == 2 and "cannot import" in out
    code, out = await run(
        "worker",
        "tests.support.consumers:Recorder",
        env={
            "B24QUEUE_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
            "B24QUEUE_CONNECT_TIMEOUT_S": "1",
            "B24QT_QUEUE": broker.name("never"),
        },
    )
    assert code == 3 and "cannot reach RabbitMQ" in out
    assert "guest:guest" not in out  # the password is never printed


async def test_a_second_signal_exits_at_once_and_loses_nothing(
    broker: Broker, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    queue = broker.name("proc")
    worker = await start_worker(broker, record, sleep_s=3600, prefetch=2)
    try:
        await wait_until(lambda: _declared_and_consuming(broker, queue), what="worker consuming")
        ids = await post(broker, 2)
        await wait_until(lambda: len(records(record, "start")) == 2, what="2 handlers started")
        worker.send_signal(signal.SIGTERM)  # graceful: would wait for the hour-long handlers
        assert worker.stdout is not None
        while b"waiting up to" not in await asyncio.wait_for(worker.stdout.readline(), 10):
            pass
        worker.send_signal(signal.SIGTERM)  # impatient: exit now
        await asyncio.wait_for(worker.wait(), timeout=10)
    finally:
        if worker.returncode is None:
            worker.kill()
    assert worker.returncode == 1
    assert records(record, "done") == []
    # Nothing was acked: both are back in the queue for the next worker.
    await wait_until(lambda: _depth_is(broker, queue, 2), what="both requeued")
    assert sorted(m.message_id or "" for m in await broker.take(queue, 2)) == sorted(ids)


async def _depth_is(broker: Broker, queue: str, count: int) -> bool:
    return await broker.depth(queue) == count
