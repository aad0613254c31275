"""`b24queue ingress --processes 2`: children share the port, every event lands, /metrics sums
them all, SIGTERM stops the lot, and a child that dies takes the others down (non-zero exit)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.support.processes import alive, children_of
from tests.support.proxy import free_port
from tests.support.rabbitmq import Broker, run_cli, start_cli
from tests.support.samples import sample_form
from tests.support.wait import wait_until

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
pytestmark = pytest.mark.broker


@asynccontextmanager
async def ingress_processes(
    broker: Broker, tmp_path: Path, count: int
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    port = free_port()
    proc = await start_cli(
        broker,
        "ingress",
        *("--host", "127.0.0.1", "--port", str(port), "--processes", str(count)),
        B24QUEUE_SPOOL_PATH=str(tmp_path / "spool.sqlite3"),
    )
    base = f"http://127.0.0.1:{port}"
    kids: list[int] = []
    try:
        # Ready once every child holds its own broker connection (named with its pid).
        async def all_connected() -> bool:
            kids = children_of(proc.pid)
            names = [c["client_properties"].get("connection_name", "") for c in await conns()]
            return len(kids) == count and all(
                any(n.endswith(f":{kid}") for n in names) for kid in kids
            )

        async def conns() -> list[dict[str, object]]:
            return await broker.mgmt.connections_named("b24queue ingress #")

        await wait_until(all_connected, 30, f"{count} ingress processes connected")
        kids = children_of(proc.pid)
        yield proc, base
    finally:
        for kid in [*kids, proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 30)


async def post_each_on_its_own_connection(base: str, count: int) -> list[str]:
    connector = aiohttp.TCPConnector(force_close=True)  # new connections spread over children
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> str:
            async with session.post(
                f"{base}/b24/events", data=sample_form("crm-deal-add"), headers=FORM
            ) as resp:
                assert resp.status == 200, await resp.text()
                message_id: str = (await resp.json())["message_id"]
                return message_id

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def test_every_event_lands_and_metrics_sum_all_processes(
    broker: Broker, tmp_path: Path
) -> None:
    queue = await broker.bind_queue("all", "#")
    async with ingress_processes(broker, tmp_path, 2) as (proc, base):
        kids = children_of(proc.pid)
        ids = await post_each_on_its_own_connection(base, 120)
        assert len(set(ids)) == 120
        got = await broker.take(queue, 120)
        assert sorted(m.message_id or "" for m in got) == sorted(ids)

        # Several scrapes (each may reach either child) all count every event.
        async with aiohttp.ClientSession() as session:
            for _ in range(6):
                async with session.get(f"{base}/metrics", headers={"Connection": "close"}) as r:
                    text = await r.text()
                match = re.search(
                    r'^b24queue_ingress_accepted_total\{event="ONCRMDEALADD"\} (\S+)$',
                    text,
                    re.MULTILINE,
                )
                assert match and float(match.group(1)) == 120.0, text[:2000]

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
        for kid in kids:
            assert not alive(kid)


async def test_a_child_that_dies_stops_the_others_and_the_parent_fails(
    broker: Broker, tmp_path: Path
) -> None:
    async with ingress_processes(broker, tmp_path, 2) as (proc, _):
        first, second = children_of(proc.pid)
        os.kill(first, signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 1
        assert not alive(second)
        assert proc.stdout is not None
        out = (await proc.stdout.read()).decode()
        assert f"ingress process {first} exited" in out


async def test_a_taken_port_is_a_clear_error(broker: Broker, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = await run_cli(
            broker,
            "ingress",
            *("--host", "127.0.0.1", "--port", str(port), "--processes", "2"),
            B24QUEUE_SPOOL_PATH=str(tmp_path / "spool.sqlite3"),
        )
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in out
    assert "Traceback" not in out


async def test_a_configuration_error_stops_the_parent_before_any_child(
    broker: Broker, tmp_path: Path
) -> None:
    code, out = await run_cli(
        broker,
        "ingress",
        *("--port", str(free_port()), "--processes", "2"),
        B24QUEUE_APP_TOKENS="",
        B24QUEUE_SPOOL_PATH=str(tmp_path / "spool.sqlite3"),
    )
    assert code == 2
    assert "B24QUEUE_APP_TOKENS" in out
    assert "Traceback" not in out


async def test_children_of_a_killed_parent_shut_down_by_themselves(
    broker: Broker, tmp_path: Path
) -> None:
    async with ingress_processes(broker, tmp_path, 2) as (proc, _):
        kids = children_of(proc.pid)
        proc.kill()  # SIGKILL: no chance to forward anything
        await wait_until(lambda: not any(alive(kid) for kid in kids), 20, "orphans to exit")
