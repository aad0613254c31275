"""The CLI on the SQLite transport, as a user runs it on a host with no broker at all: ingress,
`send`, `topology`, `status`, `dlq`, and a clear error for what only RabbitMQ has."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.support.processes import ROOT
from tests.support.proxy import free_port
from tests.support.samples import SAMPLE_TOKEN
from tests.support.wait import wait_until


def env_for(db: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24QUEUE_", "B24QT_"))}
    env.update(
        {
            "B24QUEUE_BROKER_URL": f"sqlite:{db}",
            "B24QUEUE_APP_TOKENS": SAMPLE_TOKEN,
            "B24QT_QUEUE": "cli.deals",
            "B24QT_RECORD": "/dev/null",
            "B24QT_EVENTS": "ONCRMDEALADD",
            **extra,
        }
    )
    return env


async def cli(db: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "b24queue",
        *args,
        cwd=ROOT,
        env=env_for(db),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def start_ingress(db: Path, port: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "b24queue",
        "ingress",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        cwd=ROOT,
        env=env_for(db),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def test_the_tour_on_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "queue.sqlite3"
    consumer = "tests.support.consumers:Narrowing"
    code, out = await cli(db, "topology", consumer)
    assert code == 0 and "cli.deals.dlq" in out, out
    assert "exchange" not in out, out  # RabbitMQ's exchanges are not there to print
    code, out = await cli(db, "topology", "--dry-run", consumer)
    assert code == 2 and "does not offer this" in out, out

    port = free_port()
    ingress = await start_ingress(db, port)
    try:
        url = f"http://127.0.0.1:{port}/b24/events"

        async def sent() -> bool:
            code, out = await cli(db, "send", "ONCRMDEALADD", "--url", url)
            return code == 0 and out.startswith("200 ")

        await wait_until(sent, 30, "the ingress to take an event")
        code, out = await cli(db, "send", "ONTASKADD", "--url", url)  # nobody binds it
        assert code == 0, out
    finally:
        ingress.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(ingress.wait(), 30) == 0

    code, out = await cli(db, "status", "--json")
    assert code == 0, out
    status = json.loads(out[out.index("{") :])
    [row] = status["queues"]
    assert (row["queue"], row["ready"], row["dead_letters"]) == ("cli.deals", 1, 0)
    assert status["unrouted"] == 1
    code, out = await cli(db, "dlq", "list", "b24.unrouted")
    assert code == 0 and "ONTASKADD" in out, out
    code, out = await cli(db, "dlq", "purge", "b24.unrouted", "--yes")
    assert code == 0 and "purged 1" in out, out


@pytest.mark.fault
async def test_sigkill_of_the_ingress_under_load_loses_no_accepted_event(tmp_path: Path) -> None:
    """Every event answered 200 is in the queue file, whatever the moment the ingress dies."""
    import sqlite3

    import aiohttp

    from tests.support.samples import sample_form

    db = tmp_path / "queue.sqlite3"
    code, out = await cli(db, "topology", "tests.support.consumers:Narrowing")
    assert code == 0, out
    port = free_port()
    ingress = await start_ingress(db, port)
    url = f"http://127.0.0.1:{port}/b24/events"
    accepted: list[str] = []
    body = sample_form("crm-deal-add")

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with session.post(
                url, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
            ) as resp:
                if resp.status == 200:
                    accepted.append((await resp.json())["message_id"])
        except (aiohttp.ClientError, OSError):
            pass  # the ingress died under it: not answered 200, so not promised

    try:
        async with aiohttp.ClientSession() as session:

            async def up() -> bool:
                await one(session)
                return bool(accepted)

            await wait_until(up, 30, "the ingress to answer")
            sem = asyncio.Semaphore(16)

            async def limited() -> None:
                async with sem:
                    await one(session)

            load = [asyncio.create_task(limited()) for _ in range(600)]
            await wait_until(lambda: len(accepted) >= 150, 60, "150 accepted")
            ingress.kill()  # mid-load: requests in flight die with it
            await asyncio.gather(*load)
    finally:
        if ingress.returncode is None:
            ingress.kill()
        await ingress.wait()
    conn = sqlite3.connect(db)
    try:
        stored = {m for (m,) in conn.execute("SELECT message_id FROM messages")}
    finally:
        conn.close()
    # SIGKILL leaves the page cache: what makes a 200 survive a power cut is the fsync'd WAL.
    from b24queue.transports.sqlite.db import connect

    check = connect(db)
    try:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert check.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        check.close()
    assert len(accepted) >= 150
    assert set(accepted) <= stored, len(set(accepted) - stored)


async def test_publish_prints_the_confirmed_message_id_and_a_key_fixes_it(tmp_path: Path) -> None:
    from b24queue.settings import load_settings
    from b24queue.transports import transport_for

    db = tmp_path / "queue.sqlite3"
    args = ("publish", "app.deal.recheck", "--data", '{"deal_id": "42"}', "--key", "d42")
    code, out = await cli(db, *args)
    assert code == 0, out
    first = out.splitlines()[-1]  # stdout's one line, after the log's (stderr)
    code, out = await cli(db, *args)
    assert code == 0 and out.splitlines()[-1] == first and len(first) == 32
    # Confirmed: in the queue (nobody binds it: the unrouted queue), with its data.
    settings = load_settings(broker_url=f"sqlite:{db}")
    async with transport_for(settings).dead_letters(settings.unrouted) as unrouted:
        total, letters = await unrouted.list(10)
    assert total == 2 and {x.message_id for x in letters} == {first}
    code, out = await cli(db, "publish", "APP.X", "--data", "{not json")
    assert code == 2 and "--data: not JSON" in out
    code, out = await cli(db, "publish", "ONCRMDEALADD")
    assert code == 2 and "must start with 'APP.'" in out
