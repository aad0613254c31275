"""The CLI on the SQLite transport, as a user runs it on a host with no broker at all: ingress,
`send`, `topology`, `status`, `dlq`, and a clear error for what only RabbitMQ has."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

from tests.conftest import SAMPLE_TOKEN
from tests.integration.conftest import ROOT, wait_until


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_the_tour_on_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "queue.sqlite3"
    consumer = "tests.integration.consumers:Narrowing"
    code, out = await cli(db, "topology", consumer)
    assert code == 0 and "cli.deals.dlq" in out, out
    code, out = await cli(db, "topology", "--dry-run", consumer)
    assert code == 2 and "RabbitMQ's" in out, out

    port = free_port()
    ingress = await asyncio.create_subprocess_exec(
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
