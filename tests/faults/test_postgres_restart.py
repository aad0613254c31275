"""PostgreSQL restarted under load (`pg_ctlcluster ... restart`): a real ingress and two real
workers on the machine's PostgreSQL, a steady load through the ingress. Every event answered 200
is handled at least once; the ingress spools while PostgreSQL is away. The cluster is left
running, as it was found."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from b24queue.settings import Settings
from tests.conftest import sample_form
from tests.faults.conftest import SUMMARY
from tests.integration.proxy import free_port
from tests.postgres import POSTGRES_URL, postgres_schema
from tests.processes import cli, env_for, ingress_up, start_workers, stop

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
RATE_PER_S = 150
DURATION_S = 12.0
FAULT_AT_S = 4.0


def cluster() -> tuple[str, str] | None:
    """(version, name) of the cluster on port 5432, from pg_lsclusters."""
    try:
        out = subprocess.run(
            ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "5432":
            return parts[0], parts[1]
    return None


def handled(record: Path) -> list[str]:
    return record.read_text().split() if record.exists() else []


class SteadyLoad:
    """Posts at a steady rate through the ingress; remembers every answer and its time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.accepted: list[str] = []
        self.accepted_at: dict[str, float] = {}  # message_id -> wall time of its 200
        self.answers: list[tuple[float, int]] = []  # (seconds since the start, status; 0: none)
        self.sent = 0
        self.ran_s = 0.0  # how long it posted
        self._began = time.monotonic()
        self.started_at = time.time()  # the wall clock at the start (answers are relative)

    def now(self) -> float:
        return time.monotonic() - self._began

    async def _one(self, session: aiohttp.ClientSession) -> None:
        try:
            async with session.post(self.url, data=sample_form("crm-deal-add"), headers=FORM) as r:
                self.answers.append((self.now(), r.status))
                if r.status == 200:
                    message_id = (await r.json())["message_id"]
                    self.accepted.append(message_id)
                    self.accepted_at[message_id] = time.time()
        except (aiohttp.ClientError, OSError):
            self.answers.append((self.now(), 0))

    async def run(self, duration_s: float | Callable[[], float], rate_per_s: float) -> None:
        """Post for `duration_s` seconds (or as long as the function says, asked as it goes)."""
        self._began, self.started_at = time.monotonic(), time.time()
        tasks = []
        async with aiohttp.ClientSession() as session:
            while (elapsed := self.now()) < (duration_s() if callable(duration_s) else duration_s):
                while self.sent < int(elapsed * rate_per_s):
                    tasks.append(asyncio.create_task(self._one(session)))
                    self.sent += 1
                await asyncio.sleep(0.005)
            self.ran_s = self.now()
            await asyncio.gather(*tasks)


async def why(settings: Settings, lost: set[str], tmp_path: Path) -> str:
    """The processes' logs and the rows left of the lost events, for the failure message."""
    text = "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    db = await asyncpg.connect(POSTGRES_URL)
    try:
        rows = await db.fetch(
            "SELECT id, queue, lease_owner, lease_until, deliveries, available_at FROM "
            f'"{settings.postgres_schema}".messages WHERE message_id = any($1::text[])',
            list(lost),
        )
    finally:
        await db.close()
    return text + "\nrows of the lost:\n" + "\n".join(str(dict(r)) for r in rows[:20])


async def test_postgres_restart_under_load_loses_nothing(tmp_path: Path) -> None:
    found = cluster()
    if found is None:
        pytest.skip("no pg_lsclusters cluster on port 5432 to restart")
    version, name = found
    record = tmp_path / "record.txt"
    async with postgres_schema(f"t{uuid.uuid4().hex[:10]}") as settings:
        env = env_for(settings, record, B24QT_QUEUE="faults.pg", B24QT_PREFETCH="16")
        code, out = await cli(settings, "topology", "tests.faults.consumers:FaultRecorder")
        assert code == 0, out
        workers = await start_workers(env, tmp_path, "tests.faults.consumers:FaultRecorder")
        port = free_port()
        ingress = await ingress_up(settings, tmp_path, port)
        load = SteadyLoad(f"http://127.0.0.1:{port}/b24/events")
        restarted: list[float] = []

        async def restart() -> None:
            await asyncio.sleep(FAULT_AT_S)
            restarted.append(load.now())
            proc = await asyncio.create_subprocess_exec(
                "pg_ctlcluster", version, name, "restart", "-m", "fast"
            )
            assert await proc.wait() == 0
            restarted.append(load.now())

        try:
            fault = asyncio.create_task(restart())
            await load.run(DURATION_S, RATE_PER_S)
            await fault
            accepted, answers, sent = load.accepted, load.answers, load.sent
            want = set(accepted)
            deadline = time.monotonic() + 90
            while not want <= set(handled(record)) and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            for proc in (*workers, ingress):
                assert await stop(proc) == 0
        finally:
            subprocess.run(["pg_ctlcluster", version, name, "start"], check=False)
        seen = handled(record)
        lost = want - set(seen)
        down_from, down_to = restarted
        during = [s for t, s in answers if down_from <= t <= down_to + 1.0]
        ok_during = sum(1 for s in during if s == 200)
        SUMMARY.append(
            {
                "fault": "postgres restart",
                "sent": sent,
                "accepted": len(accepted),
                "refused": sent - len(accepted),
                "handled": len(set(seen)),
                "in_dlq": 0,
                "lost": len(lost),
                "duplicates": len(seen) - len(set(seen)),
                "note": f"restart took {down_to - down_from:.1f}s; answered 200 during it and "
                f"the second after: {ok_during}/{len(during)}",
            }
        )
        if lost:
            pytest.fail(
                f"{len(lost)} accepted events never handled\n{await why(settings, lost, tmp_path)}"
            )
        assert len(accepted) == sent, "the ingress refused events while PostgreSQL restarted"
