"""Real `b24queue` processes for tests on every transport: the environment for a queue's
settings, the CLI, an ingress, workers, and posting through the ingress; which processes run.
Whatever a test starts here is killed after it, if it is still running (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from b24queue.settings import Settings
from tests.support.samples import FORM, SAMPLE_TOKEN, sample_form
from tests.support.wait import wait_until

ROOT = Path(__file__).parents[2]  # the repository: where `python -m b24queue` runs
STARTED: list[asyncio.subprocess.Process] = []


async def kill_leftovers() -> None:
    while STARTED:
        proc = STARTED.pop()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def env_for(settings: Settings, record: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24QUEUE_", "B24QT_"))}
    env.update(
        {
            "B24QUEUE_BROKER_URL": settings.broker_url,
            "B24QUEUE_POSTGRES_SCHEMA": settings.postgres_schema,
            "B24QUEUE_UNROUTED": settings.unrouted,
            "B24QUEUE_POSTGRES_POLL_S": "0.5",
            "B24QUEUE_REDIS_PREFIX": settings.redis_prefix,
            "B24QUEUE_REDIS_POLL_S": "0.2",
            "B24QUEUE_KAFKA_PARTITIONS": str(settings.kafka_partitions),
            "B24QUEUE_KAFKA_SESSION_TIMEOUT_S": str(settings.kafka_session_timeout_s),
            "B24QUEUE_APP_TOKENS": SAMPLE_TOKEN,
            "B24QUEUE_SHUTDOWN_TIMEOUT_S": "20",
            "B24QUEUE_SPOOL_PATH": str((record or Path("/tmp/x")).parent / "spool.sqlite3"),
            "B24QT_QUEUE": "cli.deals",
            "B24QT_RECORD": str(record or "/dev/null"),
            "B24QT_EVENTS": "ONCRMDEALADD",
            **extra,
        }
    )
    if settings.transport == "kafka":  # a test's own namespace: its events topic
        env.setdefault("B24QUEUE_EXCHANGE", settings.exchange)
    return env


async def cli(settings: Settings, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "b24queue",
        *args,
        cwd=ROOT,
        env=env_for(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def start(
    *args: str, env: dict[str, str], log: Path | None = None
) -> asyncio.subprocess.Process:
    """A `b24queue` process; its output to `log` (read it when a test fails), else dropped."""
    out = open(log, "ab") if log is not None else None  # noqa: SIM115 - the child holds it
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "b24queue",
        *args,
        cwd=ROOT,
        env=env,
        stdout=out if out is not None else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.STDOUT,
    )
    if out is not None:
        out.close()
    STARTED.append(proc)
    return proc


async def stop(proc: asyncio.subprocess.Process, log: Path | None = None) -> int:
    """SIGTERM, and its exit code within 30 s; past that an AssertionError with the end of its
    `log` (what it was doing), and the process killed."""
    proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
        raise AssertionError(f"{proc.pid} did not stop within 30 s of SIGTERM:\n{tail}") from None


def lines(record: Path, kind: str) -> list[str]:
    if not record.exists():
        return []
    return [ln.split()[1] for ln in record.read_text().splitlines() if ln.startswith(kind + " ")]


async def post(url: str, count: int, name: str = "crm-deal-add") -> list[str]:
    ids = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.post(url, data=sample_form(name), headers=FORM) as resp:
                assert resp.status == 200, await resp.text()
                ids.append((await resp.json())["message_id"])
    return ids


async def ingress_up(settings: Settings, tmp_path: Path, port: int) -> asyncio.subprocess.Process:
    return await ingress_with(env_for(settings, tmp_path / "ingress.record"), tmp_path, port)


async def ingress_with(
    env: dict[str, str], tmp_path: Path, port: int
) -> asyncio.subprocess.Process:
    """`b24queue ingress` on `port` with this environment, once it answers ready."""
    args = ("ingress", "--host", "127.0.0.1", "--port", str(port))
    proc = await start(*args, env=env, log=tmp_path / "ingress.log")

    async def ready() -> bool:
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://127.0.0.1:{port}/readyz") as r,
            ):
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_until(ready, 30, "the ingress ready")
    return proc


async def start_workers(
    env: dict[str, str], tmp_path: Path, consumer: str, count: int = 2
) -> list[asyncio.subprocess.Process]:
    """`count` worker processes, consuming (their queue declared) when this returns; their
    output in tmp_path/worker<i>.log."""
    logs = [tmp_path / f"worker{i}.log" for i in range(count)]
    workers = [await start("worker", consumer, env=env, log=log) for log in logs]
    await wait_until(
        lambda: all(p.exists() and "worker running" in p.read_text() for p in logs),
        60,
        "the workers consuming",
    )
    return workers


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
