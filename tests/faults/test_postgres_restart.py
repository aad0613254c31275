"""PostgreSQL restarted under load (`pg_ctlcluster ... restart`): a real ingress and two real
workers on the machine's PostgreSQL, a steady load through the ingress. Every event answered 200
is handled at least once; the ingress spools while PostgreSQL is away. The cluster is left
running, as it was found."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from b24queue.settings import Settings
from tests.support.faults import SUMMARY, SteadyLoad, handled
from tests.support.postgres import POSTGRES_URL, postgres_schema
from tests.support.processes import cli, env_for, ingress_up, start_workers, stop
from tests.support.proxy import free_port

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
        code, out = await cli(settings, "topology", "tests.support.consumers:FaultRecorder")
        assert code == 0, out
        workers = await start_workers(env, tmp_path, "tests.support.consumers:FaultRecorder")
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
