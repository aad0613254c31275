"""Redis stopped under load and started again from its append-only file: gracefully (SHUTDOWN)
and by SIGKILL. A real ingress and two real workers, a steady load through the ingress: every
event answered 200 is handled at least once; the ingress spools while Redis is away."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from b24queue.settings import load_settings
from tests.support.faults import SUMMARY, SteadyLoad, handled
from tests.support.processes import cli, env_for, ingress_up, start_workers, stop
from tests.support.proxy import free_port
from tests.support.redis_server import redis_server
from tests.support.samples import SAMPLE_TOKEN

RATE_PER_S = 150
DURATION_S = 12.0
FAULT_AT_S = 4.0
DOWN_S = 1.5


@pytest.mark.parametrize("how", ["shutdown", "sigkill"])
async def test_redis_restart_under_load_loses_nothing(how: str, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    with redis_server() as server:
        settings = load_settings(
            broker_url=server.url, redis_prefix=f"t{uuid.uuid4().hex[:10]}", app_tokens=SAMPLE_TOKEN
        )
        env = env_for(settings, record, B24QT_QUEUE="faults.redis", B24QT_PREFETCH="16")
        code, out = await cli(settings, "topology", "tests.support.consumers:FaultRecorder")
        assert code == 0, out
        workers = await start_workers(env, tmp_path, "tests.support.consumers:FaultRecorder")
        port = free_port()
        ingress = await ingress_up(settings, tmp_path, port)
        load = SteadyLoad(f"http://127.0.0.1:{port}/b24/events")
        window: list[float] = []

        async def fault() -> None:
            await asyncio.sleep(FAULT_AT_S)
            window.append(load.now())
            await asyncio.to_thread(server.shutdown if how == "shutdown" else server.kill)
            await asyncio.sleep(DOWN_S)
            await asyncio.to_thread(server.start)
            window.append(load.now())

        task = asyncio.create_task(fault())
        await load.run(DURATION_S, RATE_PER_S)
        await task
        want = set(load.accepted)
        deadline = time.monotonic() + 90
        while not want <= set(handled(record)) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        for proc in (*workers, ingress):
            assert await stop(proc) == 0
    seen = handled(record)
    lost = want - set(seen)
    down_from, down_to = window
    during = [s for t, s in load.answers if down_from <= t <= down_to + 1.0]
    SUMMARY.append(
        {
            "fault": f"redis {how}",
            "sent": load.sent,
            "accepted": len(load.accepted),
            "refused": load.sent - len(load.accepted),
            "handled": len(set(seen)),
            "in_dlq": 0,
            "lost": len(lost),
            "duplicates": len(seen) - len(set(seen)),
            "note": f"down {down_to - down_from:.1f}s; answered 200 while down and the second "
            f"after: {sum(1 for s in during if s == 200)}/{len(during)}",
        }
    )
    if lost:
        text = "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in tmp_path.glob("*.log"))
        pytest.fail(f"{len(lost)} accepted events never handled\n{text}")
    assert len(load.accepted) == load.sent, "the ingress refused events while Redis was away"
