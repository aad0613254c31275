"""The fault suites' harness (tests/faults, tests/cluster): a RabbitMQ node of their own (so
stopping it disturbs nothing else), real `b24queue ingress` and `b24queue worker` processes, a
load that records every message_id answered 200, and the accounting at the end: accepted,
handled, lost, duplicates (the rows each suite prints at the end of its run)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from b24queue.events.forms import encode_form
from b24queue.transports.amqp.layout import SHARDS
from tests.support.processes import ROOT
from tests.support.proxy import Proxy, free_port
from tests.support.samples import FORM, SAMPLE_TOKEN, sample_form

NODE_PORT = int(os.environ.get("B24QT_FAULT_AMQP_PORT", "5679"))
MGMT_PORT = NODE_PORT + 10000
PROM_PORT = NODE_PORT + 10020
CONSUMER_TIMEOUT_MS = 6000
NODE_ENV = {
    "AMQP_PORT": str(NODE_PORT),
    "MGMT_PORT": str(MGMT_PORT),
    "PROM_PORT": str(PROM_PORT),
    "CONSUMER_TIMEOUT_MS": str(CONSUMER_TIMEOUT_MS),
    "CHANNEL_TICK_MS": "1000",
}
AMQP_URL = f"amqp://guest:guest@127.0.0.1:{NODE_PORT}/"
NODE_NAME = f"b24queue{NODE_PORT}@localhost"

SUMMARY: list[dict[str, Any]] = []  # make faults: a row per fault
CLUSTER_SUMMARY: list[dict[str, Any]] = []  # make faults-cluster: a row per scenario


def node_ctl(*args: str, timeout_s: float = 120) -> str:
    """rabbitmqctl against the fault node (run as the broker's user, like local-node.sh)."""
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": NODE_NAME,
    }
    out = subprocess.run(
        ["rabbitmqctl", "-n", NODE_NAME, "-q", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )
    return out.stdout


def event_body(i: int, mode: str = "") -> bytes:
    fields: dict[str, Any] = {"ID": str(i)}
    if mode:
        fields["MODE"] = mode
    return encode_form(
        {
            "event": "ONCRMDEALUPDATE",
            "event_handler_id": "42",
            "data": {"FIELDS": fields},
            "ts": str(int(time.time())),
            "auth": {
                "domain": "acme.bitrix24.com",
                "member_id": "5f2a9c3e1b7d4a6f8e0c2b4d6f8a0c1e",
                "application_token": SAMPLE_TOKEN,
            },
        }
    )


@dataclass
class Load:
    sent: int = 0
    accepted: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    accepted_event: asyncio.Event = field(default_factory=asyncio.Event)


class Harness:
    """One test's processes and names on the fault node."""

    def __init__(self, tmp: Path, *, spool: bool = True, amqp_url: str = AMQP_URL) -> None:
        self.prefix = f"f{uuid.uuid4().hex[:8]}"
        self.tmp = tmp
        self.queue = f"{self.prefix}.deals"
        self.record = tmp / "handled.txt"
        self.markers = tmp / "markers"
        self.markers.mkdir()
        self.spool = spool
        self.amqp_url = amqp_url
        self.port = free_port()
        self.ingress: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.dead_lettered: set[str] = set()  # the accepted events `settle` found in the DLQ

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("B24QUEUE_", "B24QT_"))}
        env.update(
            {
                "B24QUEUE_AMQP_URL": self.amqp_url,
                "B24QUEUE_MANAGEMENT_URL": f"http://127.0.0.1:{MGMT_PORT}",
                "B24QUEUE_EXCHANGE": f"{self.prefix}.events",
                "B24QUEUE_UNROUTED": f"{self.prefix}.unrouted",
                "B24QUEUE_APP_TOKENS": SAMPLE_TOKEN,
                "B24QUEUE_SPOOL_ENABLED": "true" if self.spool else "false",
                "B24QUEUE_SPOOL_PATH": str(self.tmp / "spool.sqlite3"),
                "B24QUEUE_RECONNECT_INTERVAL_S": "0.3",
                "B24QUEUE_CONNECT_TIMEOUT_S": "30",
                "B24QUEUE_SHUTDOWN_TIMEOUT_S": "15",
                "B24QT_QUEUE": self.queue,
                "B24QT_RECORD": str(self.record),
                "B24QT_MARKERS": str(self.markers),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra)
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:  # the child keeps its own descriptor
            return subprocess.Popen(
                [sys.executable, "-m", "b24queue", *argv],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def start_ingress(self, **extra: str) -> None:
        self.ingress = self._spawn(
            "ingress",
            ["ingress", "--host", "127.0.0.1", "--port", str(self.port)],
            self.env(**extra),
        )
        await self.wait_http("/healthz")

    async def wait_http(self, path: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}{path}") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"ingress {path} not 200 in {timeout_s}s: {self.tail()}")

    def start_worker(self, **extra: str) -> subprocess.Popen[bytes]:
        proc = self._spawn(
            "worker", ["worker", "tests.support.consumers:FaultRecorder"], self.env(**extra)
        )
        self.workers.append(proc)
        return proc

    async def start_worker_past(self, proxy: Proxy) -> None:
        """Start a worker straight on the broker (not through `proxy`, which is cut), wait until
        it consumes, then let the proxy listen again."""
        through_proxy = self.amqp_url
        self.amqp_url = f"amqp://guest:guest@127.0.0.1:{proxy.target_port}/"
        try:
            self.start_worker()
            await self.wait_consuming()
        finally:
            self.amqp_url = through_proxy
        await proxy.start()

    async def wait_consuming(self, count: int = 1, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if await self.consumer_count() >= count:
                    return
            except Exception:  # not declared yet
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"no consumer on {self.queue}: {self.tail()}")

    async def consumer_count(self) -> int:
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            q = await channel.declare_queue(self.queue, passive=True)
            return int(q.declaration_result.consumer_count or 0)
        finally:
            await connection.close()

    async def metric(self, name: str) -> float:
        """A label-less sample from the ingress's /metrics."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.port}/metrics") as resp,
        ):
            text = await resp.text()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")

    def handled(self) -> list[str]:
        if not self.record.exists():
            return []
        return [line for line in self.record.read_text().splitlines() if line]

    async def drain_ids(self, queue: str) -> list[str]:
        """Take (and ack) every message of a queue on the fault node; their message ids."""
        ids: list[str] = []
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            try:
                q = await channel.declare_queue(queue, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return []
            while (message := await q.get(no_ack=False, fail=False)) is not None:
                ids.append(message.message_id or "")
                await message.ack()
        finally:
            await connection.close()
        return ids

    async def load(
        self,
        load: Load,
        count: int,
        *,
        concurrency: int = 16,
        mode: str = "",
        first: int = 0,
        fresh_connections: bool = False,
    ) -> None:
        """POST `count` events as a portal would; record what was answered 200.

        `fresh_connections` opens a connection per request (as Bitrix24 does) instead of keeping
        a few alive, so the requests spread over all processes of a multi-process ingress."""
        url = f"http://127.0.0.1:{self.port}/b24/events"
        next_i = first
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(force_close=fresh_connections)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

            async def one() -> None:
                nonlocal next_i
                while next_i < first + count:
                    i = next_i
                    next_i += 1
                    load.sent += 1
                    try:
                        async with session.post(
                            url,
                            data=event_body(i, mode),
                            headers={"Content-Type": "application/x-www-form-urlencoded"},
                        ) as resp:
                            body = await resp.json(content_type=None)
                            load.statuses[resp.status] += 1
                            if resp.status == 200:
                                load.accepted.append(body["message_id"])
                                load.accepted_event.set()
                    except (aiohttp.ClientError, TimeoutError):
                        load.statuses[0] += 1

            await asyncio.gather(*(one() for _ in range(concurrency)))

    async def settle(
        self, load: Load, fault: str, timeout_s: float = 90, expect_dlq: int = 0
    ) -> dict[str, Any]:
        """Wait until every accepted event was handled; then account for each of them."""
        accepted = set(load.accepted)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(accepted - set(self.handled())) <= expect_dlq:
                break
            await asyncio.sleep(0.2)
        handled = self.handled()
        in_dlq = set(await self.drain_ids(f"{self.queue}.dlq"))
        waiting = set(await self.drain_ids(self.queue))
        for i in range(SHARDS):  # a fair queue's events wait in its shards (docs/fairness.md)
            waiting |= set(await self.drain_ids(f"{self.queue}.s{i}"))
        unrouted = set(await self.drain_ids(f"{self.prefix}.unrouted"))
        lost = accepted - set(handled) - in_dlq - waiting - unrouted
        row = {
            "fault": fault,
            "sent": load.sent,
            "accepted": len(accepted),
            "refused": load.sent - len(load.accepted),
            "handled": len(set(handled) & accepted),
            "in_dlq": len(in_dlq & accepted),
            "lost": len(lost),
            "duplicates": len(handled) - len(set(handled)),
        }
        SUMMARY.append(row)
        self.dead_lettered = in_dlq & accepted
        assert not lost, f"{len(lost)} accepted events lost: {sorted(lost)[:5]}\n{self.tail()}"
        return row

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.logs if p.exists())

    def stop_all(self) -> None:
        for proc in [*self.workers, *([self.ingress] if self.ingress else [])]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers, *([self.ingress] if self.ingress else [])]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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
