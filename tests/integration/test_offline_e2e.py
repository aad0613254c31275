"""Done when: with the ingress stopped for a while, changes made on the (fake) portal meanwhile
reach the consumers after it comes back, through the offline queue.

Real processes on the real RabbitMQ: the ingress, a worker whose handler reads each deal back
from the portal (tests/support/portal_worker.py), and the puller (tests/support/offline_puller.py)
polling only once an hour, so only ONOFFLINEEVENT pings through the ingress make it pull."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.fake_offline import FakeOffline
from tests.support.fake_portal import FakePortal
from tests.support.offline_setup import app_token, installed, offline_env, ping_payload
from tests.support.portal_setup import domain_of, portal_env
from tests.support.processes import ROOT, STARTED, ingress_with, stop
from tests.support.proxy import free_port
from tests.support.rabbitmq import Broker, cli_env
from tests.support.samples import SAMPLE_TOKEN
from tests.support.wait import wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MEMBER = "me2e0ff"
HOST = domain_of(MEMBER)


async def ingress(broker: Broker, port: int, tmp_path: Path) -> asyncio.subprocess.Process:
    env = cli_env(
        broker,
        B24QUEUE_SPOOL_PATH=str(tmp_path / "spool.sqlite3"),
        B24QUEUE_APP_TOKENS=f"{SAMPLE_TOKEN},{app_token(MEMBER)}",  # the ping's is the portal's
    )
    return await ingress_with(env, tmp_path, port)


async def python_module(module: str, env: dict[str, str], log: Path, ready: str) -> Any:
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, cwd=ROOT, env=env,
            stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    STARTED.append(proc)
    await wait_until(lambda: log.exists() and ready in log.read_text(), 60, f"{module} running")
    return proc


def deals_read(record: Path) -> set[int]:
    text = record.read_text() if record.exists() else ""
    return {int(line.split()[0]) for line in text.splitlines()}


# 7-8 s: long, run by make faults (make test within its ten minutes).
@pytest.mark.long
async def test_changes_made_while_the_ingress_was_down_reach_the_consumers(
    broker: Broker, fake_portal: FakePortal, portal_certificate: Any, tmp_path: Path
) -> None:
    offline = FakeOffline.attach(fake_portal.rest)
    store = f"sqlite:{tmp_path / 'portals.db'}"
    await installed(store, fake_portal.rest, offline, MEMBER)
    port = free_port()
    url = f"http://127.0.0.1:{port}/b24/events"

    async def ping(host: str, handler: str) -> None:
        async with aiohttp.ClientSession() as s, s.post(handler, json=ping_payload(MEMBER)) as r:
            assert r.status == 200

    offline.ping = ping
    offline.queue(HOST).ping_handler = url
    record = tmp_path / "deals.record"
    cert, portal_port = portal_certificate[0], fake_portal.listen_port
    worker_env = portal_env(
        broker, store, cert, portal_port, B24QT_QUEUE=broker.name("deals"),
        B24QT_RECORD=str(record), B24QUEUE_PORTAL_BURST="50", B24QUEUE_PORTAL_DRAIN_PER_S="100",
    )  # fmt: skip
    puller_env = offline_env(broker, store, cert, portal_port, offline_poll_s=3600)
    front = await ingress(broker, port, tmp_path)
    worker = await python_module(
        "tests.support.portal_worker", worker_env, tmp_path / "w.log", "worker running"
    )
    puller = await python_module(
        "tests.support.offline_puller", puller_env, tmp_path / "p.log", "offline puller running"
    )
    try:
        await offline.change(HOST, "ONCRMDEALUPDATE", 1)
        await wait_until(lambda: deals_read(record) == {1}, 30, "deal 1 read")

        await stop(front)  # the ingress goes away for a while
        for deal in range(2, 51):
            await offline.change(HOST, "ONCRMDEALUPDATE", deal)  # its pings are lost
        assert offline.pings == 50 and len(offline.waiting(HOST)) == 49  # kept on the portal
        assert deals_read(record) == {1}

        front = await ingress(broker, port, tmp_path)  # back
        await offline.change(HOST, "ONCRMDEALUPDATE", 51)  # the first ping that gets through
        await wait_until(lambda: len(deals_read(record)) == 51, 60, "every deal read")
        assert deals_read(record) == set(range(1, 52))
        assert not offline.waiting(HOST)
        gets = [p for _, m, p in offline.calls if m == "event.offline.get"]
        assert len(gets) <= 6  # woken by pings (and its start), not polling
    finally:
        for proc in (puller, worker, front):
            if proc.returncode is None:
                await stop(proc)
