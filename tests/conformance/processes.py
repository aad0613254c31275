"""Real `b24queue worker` processes on every transport: SIGKILL mid-handler redelivers (flagged
redelivered), SIGTERM lets in-flight handlers finish (each transport runs them through its own
`bench`: tests/transports/<name>/test_conformance.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.bench import Bench
from tests.support.processes import ROOT
from tests.support.wait import wait_until


def records(path: Path, kind: str) -> dict[str, str]:
    """message_id -> redelivered flag, of the `kind` lines (start / done)."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[0] == kind:
            out[parts[1]] = parts[2]
    return out


_STARTED: list[asyncio.subprocess.Process] = []


async def start_worker(
    bench: Bench,
    record: Path,
    sleep_s: float,
    consumer: str = "tests.support.consumers:Recorder",
    **more: str,
) -> asyncio.subprocess.Process:
    """A `b24queue worker` of `consumer` on the bench's queue (`more`: B24QT_* variables)."""
    s = bench.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24QUEUE_", "B24QT_"))}
    env.update(
        {
            "B24QUEUE_BROKER_URL": s.broker_url,
            "B24QUEUE_EXCHANGE": s.exchange,
            "B24QUEUE_UNROUTED": s.unrouted,
            "B24QUEUE_SHUTDOWN_TIMEOUT_S": "20",
            "B24QUEUE_SQLITE_POLL_S": "0.05",
            "B24QUEUE_POSTGRES_SCHEMA": s.postgres_schema,
            "B24QUEUE_REDIS_PREFIX": s.redis_prefix,
            "B24QUEUE_REDIS_POLL_S": "0.2",
            "B24QUEUE_KAFKA_PARTITIONS": str(s.kafka_partitions),
            "B24QUEUE_KAFKA_SESSION_TIMEOUT_S": str(s.kafka_session_timeout_s),
            "B24QT_QUEUE": bench.name("proc"),
            "B24QT_RECORD": str(record),
            "B24QT_SLEEP_S": str(sleep_s),
            "B24QT_PREFETCH": "4",
            "B24QT_HANDLE_TIMEOUT_S": "3",
            **more,
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "b24queue",
        "worker",
        consumer,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    _STARTED.append(proc)
    # Consuming (its queue and bindings declared) before anything is posted.
    assert proc.stdout is not None
    seen = []
    async with asyncio.timeout(30):
        while True:
            line = (await proc.stdout.readline()).decode()
            seen.append(line)
            assert line, "".join(seen)
            if "worker running" in line:
                break
    asyncio.get_running_loop().create_task(_drain(proc))
    return proc


async def _drain(proc: asyncio.subprocess.Process) -> None:
    """Keep reading its output so the pipe never fills and blocks it."""
    assert proc.stdout is not None
    while await proc.stdout.readline():
        pass


class StopsWorkers:
    """Scenarios that start worker processes (`start_worker`): none is left running, whatever
    the test's end."""

    @pytest.fixture(autouse=True)
    async def _no_worker_left(self) -> AsyncIterator[None]:
        """A failing test must not leave its worker processes running."""
        yield
        while _STARTED:
            proc = _STARTED.pop()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@pytest.mark.broker
class ProcessScenarios(StopsWorkers):
    """Each transport's `TestProcessesOn<Transport>` runs these on its own `bench` fixture."""

    @pytest.mark.fault
    async def test_sigkill_mid_handler_redelivers_flagged(
        self, bench: Bench, tmp_path: Path
    ) -> None:
        record = tmp_path / "record.txt"
        worker = await start_worker(bench, record, sleep_s=2.5)
        try:
            ids = set(await bench.post(*["crm-deal-add"] * 4))
            await wait_until(lambda: set(records(record, "start")) == ids, 30, "four started")
            worker.kill()
            await worker.wait()
            assert records(record, "done") == {}
            worker = await start_worker(bench, record, sleep_s=0)
            # Within the lease (SQLite: handle_timeout_s + 5 s) or at once (RabbitMQ).
            await wait_until(lambda: set(records(record, "done")) == ids, 30, "all redelivered")
            assert set(records(record, "done").values()) == {"1"}
        finally:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
                await asyncio.wait_for(worker.wait(), 30)

    @pytest.mark.long
    async def test_sigterm_lets_in_flight_handlers_finish(
        self, bench: Bench, tmp_path: Path
    ) -> None:
        record = tmp_path / "record.txt"
        worker = await start_worker(bench, record, sleep_s=1.0)
        ids = set(await bench.post(*["crm-deal-add"] * 3))
        await wait_until(lambda: set(records(record, "start")) == ids, 30, "three started")
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 30) == 0
        assert set(records(record, "done")) == ids
        # Nothing is left to redeliver: a new worker gets nothing.
        worker = await start_worker(bench, record, sleep_s=0)
        await bench.post("crm-deal-add")
        await wait_until(lambda: len(records(record, "done")) == 4, 30, "the fourth")
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 30)
        # Four handler starts in all, no redelivery of the three the first worker finished.
        starts = [line for line in record.read_text().splitlines() if line.startswith("start")]
        assert len(starts) == 4, starts
